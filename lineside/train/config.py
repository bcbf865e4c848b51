"""TrainConfig: every training choice in one frozen, validated, dumpable object."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import yaml

from lineside.errors import LinesideError

from .augment import AugmentConfig

STRATEGIES = ("auto", "linear", "finetune", "full", "scratch")
BALANCE = ("loss", "sampler", "none")
DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class TrainConfig:
    backbone: str = "efficientnet_lite0"
    weights: str = "imagenet"  # imagenet | none | path to a state dict
    strategy: str = "auto"
    unfreeze: str = "auto"  # finetune: 'auto' (backbone default), 'all', or a number of deepest stages
    taps: str = "last"  # linear: stages whose pooled outputs feed the head: last, mid, or 'a,b,c'
    epochs: int | None = None  # None: the strategy's default
    batch_size: int = 32
    lr: float = 1e-3  # for a new head; fine-tuning the backbone uses lr / 10
    weight_decay: float = 0.01
    label_smoothing: float = 0.1
    dropout: float = 0.2
    bn_stats: str = "freeze"  # pretrained BatchNorm statistics in trained stages: freeze | adapt
    balance: str = "loss"  # class imbalance: weighted loss, balanced sampling, or nothing
    views: int | None = None  # augmented views per image cached through a frozen trunk (None: auto)
    tta: str = "auto"  # test-time views (flips/turns averaged): auto (linear recipe), on, off
    val_fraction: float | None = None  # None: 0.2 when every class has >= 25 images, else no split
    patience: int = 6  # early stopping, in epochs without validation improvement
    image_size: int | None = None  # override the backbone's input size (square)
    seed: int = 0
    threads: int | None = None
    device: str = "auto"
    skip_bad: bool = False
    calibrate: str = "auto"  # auto: a temperature and a default --reject-below from held-out predictions; off
    time_budget: float = 150.0  # auto: fine-tune only if its estimated time here (with calibration) fits; 0: no limit
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def __post_init__(self):
        def bad(option, why):
            raise LinesideError(f"--{option.replace('_', '-')}: {why}")

        if self.strategy not in STRATEGIES:
            bad("strategy", f"'{self.strategy}' is not one of {', '.join(STRATEGIES)}")
        if self.balance not in BALANCE:
            bad("balance", f"'{self.balance}' is not one of {', '.join(BALANCE)}")
        if self.bn_stats not in ("freeze", "adapt"):
            bad("bn_stats", f"'{self.bn_stats}' is not freeze or adapt")
        if self.device not in DEVICES:
            bad("device", f"'{self.device}' is not one of {', '.join(DEVICES)}")
        if self.unfreeze not in ("auto", "all") and not (str(self.unfreeze).isdigit() and int(self.unfreeze) > 0):
            bad("unfreeze", f"'{self.unfreeze}' must be auto, all, or a positive number of stages")
        if self.epochs is not None and self.epochs < 1:
            bad("epochs", "must be at least 1")
        if self.batch_size < 1:
            bad("batch_size", "must be at least 1")
        if not 0 < self.lr < 1:
            bad("lr", "must be between 0 and 1")
        if not 0 <= self.label_smoothing < 1:
            bad("label_smoothing", "must be in [0, 1)")
        if not 0 <= self.dropout < 1:
            bad("dropout", "must be in [0, 1)")
        if self.calibrate not in ("auto", "off"):
            bad("calibrate", f"'{self.calibrate}' is not auto or off")
        if not 0 <= self.time_budget <= 1e6:
            bad("time_budget", "must be a number of seconds, 0 (no limit) or more")
        if self.tta not in ("auto", "on", "off"):
            bad("tta", f"'{self.tta}' is not auto, on or off")
        if self.views is not None and not 1 <= self.views <= 64:
            bad("views", "must be between 1 and 64")
        if self.val_fraction is not None and not 0 <= self.val_fraction < 1:
            bad("val_fraction", "must be in [0, 1)")
        if self.threads is not None and self.threads < 1:
            bad("threads", "must be at least 1")
        if self.image_size is not None and not 32 <= self.image_size <= 1024:
            bad("image_size", "must be between 32 and 1024")
        if self.strategy == "scratch" and self.weights not in ("imagenet", "none"):
            bad("weights", "the scratch strategy trains from random weights; drop --weights")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        d = dict(d or {})
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise LinesideError(f"unknown training option(s): {', '.join(sorted(unknown))}")
        if "augment" in d and not isinstance(d["augment"], AugmentConfig):
            aug = d["augment"] or {}
            bad_keys = set(aug) - {f.name for f in fields(AugmentConfig)}
            if bad_keys:
                raise LinesideError(f"unknown augment option(s): {', '.join(sorted(bad_keys))}")
            d["augment"] = AugmentConfig(**aug)
        return cls(**d)

    @classmethod
    def from_yaml(cls, path, **overrides) -> "TrainConfig":
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise LinesideError(f"{path}: cannot read config ({exc})") from exc
        if not isinstance(data, dict):
            raise LinesideError(f"{path}: a config file is a mapping of option: value")
        return cls.from_dict(data).override(**overrides)

    def override(self, **changes) -> "TrainConfig":
        changes = {k: v for k, v in changes.items() if v is not None}
        aug = {k: changes.pop(k) for k in list(changes) if k in {f.name for f in fields(AugmentConfig)}}
        cfg = replace(self, **changes)
        return replace(cfg, augment=replace(cfg.augment, **aug)) if aug else cfg

    def dump(self, path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))
