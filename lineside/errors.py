"""Errors meant for people: one line that names the file or option at fault."""


class LinesideError(Exception):
    """A problem the user can fix; the CLI prints it as one line, no traceback."""


class MissingDependency(LinesideError):
    """An optional dependency is missing; the message names the extra to install."""

    def __init__(self, module: str, extra: str | None):
        target = f"'lineside[{extra}]'" if extra else "lineside (its base install)"
        super().__init__(f"this command needs the Python package '{module}'; install it with: pip install {target}")
        self.module = module
        self.extra = extra


def require(module: str, extra: str | None):
    """Import `module` or raise MissingDependency naming the extra that provides it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise MissingDependency(module, extra) from exc
