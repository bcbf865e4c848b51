"""Target box profiles: what a box is, and the runtime settings that suit it.

A profile is a small YAML file (the shipped ones live next to this module; a
user's own is any path). It names the box, describes its CPU and accelerators,
and gives the defaults `lineside run`, `bench`, `eval` and `predict` take with
`--profile` (backend, OpenVINO device, precision, threads, inference hint).
Options given on the command line always win over the profile.

    name: intel-n100
    title: Intel N100 mini PC (Alder Lake-N)
    cpu: {arch: x86_64, cores: 4, features: [avx2, avx_vnni]}
    accelerators: [{device: GPU, what: Intel UHD Graphics (24 EU)}]
    runtime: {backend: openvino, device: CPU, precision: int8}
    match: {arch: [x86_64], model_contains: [N100, N97, N200]}
    notes: free text

`match` says which hosts the probe (`lineside devices probe`) recognises as
this box: every key given must hold (arch one of, all cpu_features present,
none of without_features present, one of the model_contains substrings in the
CPU or board name).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from lineside.errors import LinesideError

HERE = Path(__file__).resolve().parent
BACKENDS = ("auto", "onnxruntime", "openvino")
PRECISIONS = ("fp32", "int8")
HINTS = ("auto", "latency", "throughput")
RUNTIME_KEYS = ("backend", "device", "precision", "threads", "hint")
TOP_KEYS = ("name", "title", "cpu", "memory_gb", "accelerators", "runtime", "match", "notes")
MATCH_KEYS = ("arch", "cpu_features", "without_features", "model_contains")


@dataclass(frozen=True)
class Profile:
    name: str
    title: str
    path: Path
    cpu: dict = field(default_factory=dict)
    memory_gb: float | None = None
    accelerators: tuple[dict, ...] = ()
    runtime: dict = field(default_factory=dict)
    match: dict = field(default_factory=dict)
    notes: str = ""

    def matches(self, host: dict) -> bool:
        """Whether a probed host (devices.probe.probe_host()) is this box. A profile
        without `match` matches nothing: it is only used by name."""
        if not self.match:
            return False
        m = self.match
        if "arch" in m and host.get("arch") not in m["arch"]:
            return False
        if "cpu_features" in m and not set(m["cpu_features"]) <= set(host.get("cpu_features", ())):
            return False
        if set(m.get("without_features", ())) & set(host.get("cpu_features", ())):
            return False
        if "model_contains" in m:
            names = f"{host.get('cpu_model', '')} {host.get('board', '')}".lower()
            if not any(s.lower() in names for s in m["model_contains"]):
                return False
        return True

    @property
    def specificity(self) -> int:
        """More criteria, more specific: a named board beats 'any x86 with VNNI'."""
        m = self.match
        return (4 * bool(m.get("model_contains")) + len(m.get("cpu_features", ())) + bool(m.get("arch"))
                + bool(m.get("without_features")))

    def to_dict(self) -> dict:
        return {"name": self.name, "title": self.title, "path": str(self.path), "cpu": self.cpu,
                "memory_gb": self.memory_gb, "accelerators": list(self.accelerators), "runtime": self.runtime,
                "match": self.match, "notes": self.notes}


def _bad(path: Path, what: str) -> LinesideError:
    return LinesideError(f"{path}: {what}")


def _str_list(path: Path, key: str, value) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise _bad(path, f"{key} must be a list of strings")
    return tuple(value)


def load_profile(path) -> Profile:
    """Read and validate one profile file; every problem names the file and the key."""
    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise _bad(path, f"cannot read profile ({exc.strerror or exc})") from exc
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise _bad(path, f"not valid YAML ({exc.__class__.__name__})") from exc
    if not isinstance(doc, dict):
        raise _bad(path, "a profile is a YAML mapping (name:, title:, runtime:, ...)")
    unknown = sorted(set(doc) - set(TOP_KEYS))
    if unknown:
        raise _bad(path, f"unknown key(s) {', '.join(map(str, unknown))} (allowed: {', '.join(TOP_KEYS)})")
    name = doc.get("name")
    if not isinstance(name, str) or not name.replace("-", "").replace("_", "").isalnum():
        raise _bad(path, "name must be letters, digits, '-' or '_'")
    runtime = doc.get("runtime") or {}
    if not isinstance(runtime, dict):
        raise _bad(path, "runtime must be a mapping")
    bad_keys = sorted(set(runtime) - set(RUNTIME_KEYS))
    if bad_keys:
        raise _bad(path, f"runtime: unknown key(s) {', '.join(map(str, bad_keys))} "
                         f"(allowed: {', '.join(RUNTIME_KEYS)})")
    for key, allowed in (("backend", BACKENDS), ("precision", PRECISIONS), ("hint", HINTS)):
        if key in runtime and runtime[key] not in allowed:
            raise _bad(path, f"runtime.{key}: '{runtime[key]}' is not one of {', '.join(allowed)}")
    if "device" in runtime and (not isinstance(runtime["device"], str) or not runtime["device"]):
        raise _bad(path, "runtime.device must be an OpenVINO device name such as CPU, GPU, NPU or AUTO")
    if "threads" in runtime and runtime["threads"] is not None and (
            not isinstance(runtime["threads"], int) or isinstance(runtime["threads"], bool)
            or runtime["threads"] < 1):
        raise _bad(path, "runtime.threads must be a positive whole number (or left out)")
    match = doc.get("match") or {}
    if not isinstance(match, dict) or set(match) - set(MATCH_KEYS):
        raise _bad(path, f"match must be a mapping with keys from {', '.join(MATCH_KEYS)}")
    match = {k: _str_list(path, f"match.{k}", v) for k, v in match.items()}
    accelerators = doc.get("accelerators") or []
    if not isinstance(accelerators, list) or not all(isinstance(a, dict) and "device" in a for a in accelerators):
        raise _bad(path, "accelerators must be a list of mappings, each with a device:")
    cpu = doc.get("cpu") or {}
    if not isinstance(cpu, dict):
        raise _bad(path, "cpu must be a mapping (arch, cores, features)")
    memory = doc.get("memory_gb")
    if memory is not None and (not isinstance(memory, (int, float)) or memory <= 0):
        raise _bad(path, "memory_gb must be a positive number")
    return Profile(name=name, title=str(doc.get("title") or name), path=path, cpu=cpu, memory_gb=memory,
                   accelerators=tuple(accelerators), runtime=dict(runtime), match=match,
                   notes=str(doc.get("notes") or "").strip())


def shipped_profiles() -> list[Profile]:
    """The profiles installed with lineside, by name."""
    profiles = [load_profile(p) for p in sorted(HERE.glob("*.yaml"))]
    seen: dict[str, Path] = {}
    for p in profiles:
        if p.name in seen:
            raise _bad(p.path, f"profile name '{p.name}' is also used by {seen[p.name]}")
        seen[p.name] = p.path
    return profiles


def get_profile(name_or_path: str, what: str = "--profile") -> Profile:
    """A shipped profile by name, or a profile file by path. `what` names the option or
    argument in errors."""
    text = str(name_or_path)
    if text.endswith((".yaml", ".yml")) or "/" in text:
        path = Path(text)
        if not path.is_file():
            raise LinesideError(f"{what}: {path}: no such profile file")
        return load_profile(path)
    profiles = {p.name: p for p in shipped_profiles()}
    if text not in profiles:
        raise LinesideError(f"{what}: no profile named '{text}' (shipped: {', '.join(sorted(profiles))}; "
                            f"or give a path to a .yaml file)")
    return profiles[text]


def resolve_runtime(profile: Profile | None, **given) -> dict:
    """Runtime settings: what the command line gave (not None), else the profile's, else
    lineside's defaults."""
    defaults = {"backend": "auto", "device": "CPU", "precision": "fp32", "threads": None, "hint": "auto"}
    out = {}
    for key, default in defaults.items():
        if given.get(key) is not None:
            out[key] = given[key]
        elif profile is not None and profile.runtime.get(key) is not None:
            out[key] = profile.runtime[key]
        else:
            out[key] = default
    return out
