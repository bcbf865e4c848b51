"""Studies: how many images per class, which recipe, and cross-validation.

Every image is read and resized once. For the `linear` recipe, frozen-backbone
features of every image (and of a few augmented views of it) are computed once
and reused by every draw, size and fold, so a whole learning curve costs one
pass of the backbone plus a few seconds of logistic regression per fit. The
other recipes train the network, on the same in-memory images.

Draws are seeded and shared: repeat r of size k uses `draw_per_class(targets, k, r)`
for every strategy, so a comparison between strategies is paired.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from lineside.dataset import ImageSet, draw_per_class, load_arrays, load_image_set
from lineside.errors import LinesideError
from lineside.learning_curve import estimate_size, extrapolation_check
from lineside.metrics import classification_report

from .augment import Augmenter
from .backbones import BACKBONES
from .calibrate import stratified_folds
from .config import TrainConfig
from .infer import FrozenForward, embed_tensors, frozen_forward
from .heads import INFER_BATCH
from .trainer import BANK_CHUNK, Trainer, resolve_strategy, view_bank

log = logging.getLogger(__name__)

STUDY_VIEWS = 2   # augmented views per image cached for the linear recipe (view 0 is the image itself)


@dataclass
class StudyData:
    images: ImageSet
    x: np.ndarray             # N x H x W x 3 uint8 at the spec size
    y: np.ndarray
    classes: list[str]
    spec: object
    bad: list[str]


def load_study_data(data, cfg: TrainConfig, progress: bool) -> StudyData:
    images = load_image_set(data)
    spec = BACKBONES.get(cfg.backbone).input_spec.with_size(cfg.image_size)
    x, images, bad = load_arrays(images, spec, cfg.skip_bad, progress, "reading images")
    return StudyData(images, x, np.asarray(images.targets, dtype=np.int64), list(images.classes), spec, bad)


def draw_key(idx: np.ndarray) -> str:
    return hashlib.sha1(np.asarray(idx, dtype=np.int64).tobytes()).hexdigest()[:12]


class FeatureCache:
    """Pooled frozen-backbone features of every image: first its flips and turns that the
    augmentation allows (identity first), then `views - 1` randomly augmented copies."""

    def __init__(self, data: StudyData, cfg: TrainConfig, views: int, progress: bool, trainer: Trainer):
        self.trainer = trainer
        model = self.trainer.model
        model.eval()
        aug = Augmenter(cfg.augment, cfg.seed + 1)
        self.group = trainer.orientations()
        total_views = len(self.group) + max(views - 1, 0)
        run = frozen_forward(model, model.embed, "embed", data.x[:1], trainer.device, len(data.x) * total_views,
                             depends=embed_tensors(model))
        with tqdm(total=len(data.x) * total_views, desc="frozen features", unit="img", disable=not progress,
                  leave=False) as bar:
            bank = view_bank(run, data.x, self.group, aug, total_views, bar.update)
        feats = bank.reshape(total_views, len(data.x), -1)
        self.feats = feats                        # views x N x D
        self.views = total_views

    def fit_predict(self, data: StudyData, train_idx, test_idx) -> np.ndarray:
        """Logistic-regression head on the drawn images' views; probabilities of the rest
        (averaged over the test-time views, as the trained model would)."""
        t = self.trainer
        bank = self.feats[:, train_idx].reshape(-1, self.feats.shape[-1])
        y = np.tile(data.y[train_idx], self.views)
        t.fit_head(bank, y, len(t.model.stages))
        at = [self.group.index(k) for k in (t.test_views("linear") or (0,))]
        with torch.inference_mode():
            logits = t.model.head(self.feats[at][:, test_idx].mean(0).to(t.device))
        return torch.softmax(logits.float(), 1).cpu().numpy()


class Study:
    """Shared machinery: data read once, features cached once, one fit per (strategy, draw)."""

    def __init__(self, data, cfg: TrainConfig, views: int = STUDY_VIEWS, progress: bool = True):
        self.cfg = cfg
        self.progress = progress
        self.views = views
        self.data = load_study_data(data, cfg, progress)
        self._cache = None
        self._base = None
        self._trunks: dict[int, torch.Tensor] = {}

    def base(self) -> Trainer:
        """A pretrained network with a linear head: the frozen part every recipe starts from."""
        if self._base is None:
            self._base = Trainer(self.cfg.override(strategy="linear"), self.data.classes, self.data.spec,
                                 progress=False)
        return self._base

    def cache(self) -> FeatureCache:
        if self._cache is None:
            self._cache = FeatureCache(self.data, self.cfg, self.views, self.progress, self.base())
        return self._cache

    def trunk(self, frozen: int) -> torch.Tensor:
        """Activations of every image after the first `frozen` (pretrained, frozen) stages,
        computed once: fine-tuned models of every draw only run the stages after them."""
        if frozen not in self._trunks:
            base = self.base()
            model = base.model.eval()
            x = self.data.x
            run = FrozenForward(model, lambda t: model.trunk(t, frozen), x[:1], base.device, len(x))
            with tqdm(total=len(x), desc="shared frozen layers", unit="img", disable=not self.progress,
                      leave=False) as bar:
                self._trunks[frozen] = torch.cat([run.map(x[s:s + BANK_CHUNK], progress=bar.update)
                                                  .to("cpu", torch.float16) for s in range(0, len(x), BANK_CHUNK)])
        return self._trunks[frozen]

    def _predict_from_trunk(self, trainer: Trainer, frozen: int, idx) -> np.ndarray:
        h = self.trunk(frozen)
        model = trainer.model.eval()
        out = []
        with torch.inference_mode():
            for s in range(0, len(idx), INFER_BATCH):
                batch = h[idx[s:s + INFER_BATCH]].to(trainer.device).float()
                out.append(torch.softmax(model.head(model.features(batch, frozen)).float(), 1).cpu().numpy())
        return np.concatenate(out)

    def run_one(self, strategy: str, train_idx, test_idx, seed: int) -> dict:
        """Train with `strategy` on train_idx, score on test_idx."""
        d = self.data
        cfg = self.cfg.override(strategy=strategy, seed=seed)
        per_class_min = int(np.bincount(d.y[train_idx], minlength=len(d.classes)).min())
        chosen, _ = resolve_strategy(cfg, per_class_min)
        t0 = time.perf_counter()
        if chosen == "linear":
            cache_was_ready = self._cache is not None
            probs = self.cache().fit_predict(d, train_idx, test_idx)
            train_s = time.perf_counter() - t0
            note = "features shared" if cache_was_ready else "includes computing the shared features"
        else:
            # auto keeps its own choice between fine-tuning and a head on the middle stages
            auto = strategy == "auto" and chosen == "finetune"
            trainer = Trainer(cfg if auto else cfg.override(strategy=chosen), d.classes, d.spec, progress=False)
            fitted = trainer.fit(d.x[train_idx], d.y[train_idx])
            if fitted.interrupted:      # Ctrl-C in the epoch loop: a study stops, it keeps no cut-short fit
                raise KeyboardInterrupt
            plan = fitted.plan
            train_s = time.perf_counter() - t0
            chosen, note = plan.strategy, ""
            if trainer.model.taps:
                probs = trainer.predict_proba(d.x[test_idx])
                note = f"head on stages {','.join(map(str, trainer.model.taps))} (auto's cross-validation)"
            elif plan.frozen > 0:
                probs = self._predict_from_trunk(trainer, plan.frozen, test_idx)
            else:
                probs = trainer.predict_proba(d.x[test_idx])
        pred = probs.argmax(1)
        report = classification_report(d.y[test_idx], pred, d.classes)
        return {"strategy": chosen, "requested": strategy, "seed": seed, "n_train": int(len(train_idx)),
                "n_eval": int(len(test_idx)), "train_s": round(train_s, 2), "note": note,
                "balanced_accuracy": report["balanced_accuracy"], "accuracy": report["accuracy"],
                "recall": {c: v["recall"] for c, v in report["per_class"].items()},
                "draw": draw_key(train_idx), "_pred": pred, "_probs": probs}


def _start(data, out, cfg: TrainConfig, views: int, progress: bool) -> tuple[float, Path, Study]:
    t0, out = time.perf_counter(), Path(out)
    study = Study(data, cfg, views, progress)     # data that cannot be read leaves no empty --out behind
    out.mkdir(parents=True, exist_ok=True)
    return t0, out, study


def _public(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.startswith("_")}


def _check_shots(data: StudyData, shots, drop_too_big: bool = False) -> list[int]:
    """The sizes to study. Each must leave an image of the smallest class to score on;
    with `drop_too_big` (the default sizes of sample-size), those that do not are left
    out with a warning, as long as two remain."""
    shots = sorted({int(s) for s in shots})
    smallest = int(np.bincount(data.y, minlength=len(data.classes)).min())
    if not shots or shots[0] < 1:
        raise LinesideError("--shots: sizes must be positive integers")
    too_big = [s for s in shots if s >= smallest]
    if too_big and drop_too_big and len(shots) - len(too_big) >= 2:
        log.warning("--shots: %s left out: the smallest class has %d images, and each size must leave some "
                    "to score on", ", ".join(map(str, too_big)), smallest)
        return [s for s in shots if s < smallest]
    if too_big:
        raise LinesideError(f"--shots: {', '.join(map(str, too_big))} leave(s) no image of the smallest class "
                            f"({smallest} images) for evaluation; use sizes below {smallest}")
    return shots


# --- sample size --------------------------------------------------------------------------

DEFAULT_SHOTS = (1, 2, 5, 10, 20, 50)


FITS = "fits.jsonl"      # sample-size: one line per finished fit, so that Ctrl-C loses none


def _fit_key(d: StudyData, cfg: TrainConfig, views: int) -> str:
    """What a saved fit was made of (the images, every option, the views): only fits with
    this key are taken up again."""
    what = {"data": d.images.fingerprint(), "config": cfg.to_dict(), "views": views}
    return hashlib.sha1(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]


def saved_fits(path: Path, key: str) -> dict[tuple[int, int], dict]:
    """The fits an earlier, interrupted run of the same study finished: (shots, repeat) -> row."""
    done = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
                if row.get("key") == key:
                    done[(int(row["shots"]), int(row["repeat"]))] = row
            except (ValueError, KeyError, TypeError, AttributeError):
                continue        # a line cut short by the interruption: that fit runs again
    return done


def fits_interrupted(done: int, total: int, path: Path) -> LinesideError:
    """What a study says when Ctrl-C stops it: how many fits are kept, where."""
    return LinesideError(f"interrupted: {done} of {total} fits are saved in {path}; the same command carries on "
                         "from there")


def run_fits(path: Path, key: str, shots: list[int], repeats: int, fit, progress: bool, desc: str,
             describe) -> list[dict]:
    """fit(k, r) -> a row, for every size k and draw r, in rounds of every size (so that
    the time per round, and the estimate of what is left, holds from the first round on);
    each finished row is appended to `path` as it ends, and those an interrupted run of the
    same study (`key`) left there are taken up, not fitted again. Returns the rows, size by
    size, each with its `shots` and `repeat`."""
    done = saved_fits(path, key)
    todo = [(k, r) for r in range(repeats) for k in shots if (k, r) not in done]
    if done and progress:
        tqdm.write(f"{desc}: {len(shots) * repeats - len(todo)} fits taken up from {path}", file=sys.stderr)
    bar = tqdm(total=len(todo), desc=desc, unit="fit", disable=not progress)
    t0 = time.perf_counter()
    try:
        with open(path, "a") as f:
            for i, (k, r) in enumerate(todo):
                row = dict(fit(k, r), shots=k, repeat=r, key=key)
                f.write(json.dumps(row) + "\n")
                f.flush()
                done[(k, r)] = row
                bar.set_postfix_str(describe(row))
                bar.update()
                if progress and i + 1 == len(shots) and len(todo) > len(shots):
                    left = (time.perf_counter() - t0) / len(shots) * (len(todo) - i - 1)
                    tqdm.write(f"{desc}: about {left / 60:.1f} min for the other {len(todo) - i - 1} fits (the "
                               f"first round of {len(shots)} sizes took {time.perf_counter() - t0:.0f} s)",
                               file=sys.stderr)
    except KeyboardInterrupt:
        bar.close()
        raise fits_interrupted(len(done), len(shots) * repeats, path) from None
    bar.close()
    return [{name: v for name, v in done[(k, r)].items() if name != "key"} for k in shots for r in range(repeats)]


def _measure_sizes(study: Study, cfg: TrainConfig, shots: list[int], repeats: int, out: Path, views: int,
                   progress: bool) -> list[dict]:
    """One fit per (size, draw) through run_fits, kept in OUT/fits.jsonl."""
    d = study.data
    if cfg.strategy == "linear":
        study.cache()        # the shared features first: the fits' times then say what the rest will take

    def fit(k, r):
        drawn, rest = draw_per_class(d.y, k, r)
        return _public(study.run_one(cfg.strategy, drawn, rest, r))

    rows = run_fits(out / FITS, _fit_key(d, cfg, views), shots, repeats, fit, progress, "sample-size study",
                    lambda row: f"{row['shots']}/class: {row['balanced_accuracy']:.2%}")
    return [{name: v for name, v in row.items() if name != "repeat"} for row in rows]


def sample_size(data, out: Path, cfg: TrainConfig, shots=DEFAULT_SHOTS, repeats: int = 5,
                target: float = 0.99, views: int = STUDY_VIEWS, progress: bool = True) -> dict:
    t_start, out, study = _start(data, out, cfg, views, progress)
    d = study.data
    shots = _check_shots(d, shots, drop_too_big=tuple(shots) == DEFAULT_SHOTS)
    rows = _measure_sizes(study, cfg, shots, repeats, out, views, progress)
    by_size = {k: [r["balanced_accuracy"] for r in rows if r["shots"] == k] for k in shots}
    overall = estimate_size(shots, by_size, target)
    per_class = {}
    for c in d.classes:
        recall = {k: [r["recall"][c] for r in rows if r["shots"] == k] for k in shots}
        est = estimate_size(shots, recall, target, boots=200)
        per_class[c] = {"mean_recall": {k: round(float(np.mean(v)), 5) for k, v in recall.items()},
                        "estimate": est.get("estimate"), "statement": est.get("statement")}
    result = {
        "study": "sample-size", "data": str(data), "classes": d.classes, "counts": d.images.counts(),
        "strategy": cfg.strategy, "strategies_used": sorted({r["strategy"] for r in rows}),
        "repeats": repeats, "target": target, "views": views,
        "sizes": [{"shots": k, "mean": float(np.mean(v)), "std": float(np.std(v)), "min": float(np.min(v)),
                   "max": float(np.max(v))} for k, v in by_size.items()],
        "estimate": overall, "per_class": per_class, "extrapolation_check": extrapolation_check(shots, by_size),
        "runs": rows, "seconds": round(time.perf_counter() - t_start, 1), "skipped_images": d.bad,
    }
    (out / "sample_size.json").write_text(json.dumps(result, indent=2))
    _plot_learning_curve(result, out / "learning_curve.png")
    (out / "report.md").write_text(_sample_size_report(result))
    return result


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plot_learning_curve(result: dict, path: Path):
    plt = _pyplot()

    from lineside.learning_curve import PowerLaw

    sizes = [s["shots"] for s in result["sizes"]]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110)
    for row in result["runs"]:
        ax.scatter(row["shots"], row["balanced_accuracy"] * 100, s=10, color="0.6", zorder=2)
    ax.errorbar(sizes, [s["mean"] * 100 for s in result["sizes"]], yerr=[s["std"] * 100 for s in result["sizes"]],
                fmt="o", color="C0", capsize=3, label="mean ± std over draws", zorder=3)
    est = result["estimate"]
    if est.get("fit"):
        f = est["fit"]
        law = PowerLaw(f["a"], f["b"], f["c"], f["rmse"])
        right = max(sizes) * 2
        if est.get("estimate"):
            right = max(right, min(est["estimate"] * 1.3, max(sizes) * 10))
        grid = np.geomspace(min(sizes), right, 200)
        ax.plot(grid, law(grid) * 100, color="C0", alpha=0.7, label=f"fit: {f['a']:.1%} - {f['b']:.3f}·n^-{f['c']:.2f}")
    ax.axhline(result["target"] * 100, color="C3", ls="--", lw=1, label=f"target {result['target']:.1%}")
    if est.get("estimate"):
        ax.axvline(est["estimate"], color="C3", ls=":", lw=1)
    ax.set_xscale("log")
    ax.set_xlabel("training images per class")
    ax.set_ylabel("balanced accuracy on held-out images (%)")
    ax.set_title(f"Learning curve ({', '.join(result['strategies_used'])})", fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    for c, info in result["per_class"].items():
        ks = [int(k) for k in info["mean_recall"]]
        ax2.plot(ks, [v * 100 for v in info["mean_recall"].values()], marker="o", ms=3, label=c)
    ax2.set_xscale("log")
    ax2.set_xlabel("training images per class")
    ax2.set_ylabel("recall (%)")
    ax2.set_title("Per class (mean recall over draws)", fontsize=10)
    ax2.legend(fontsize=7, loc="lower right")
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _sample_size_report(r: dict) -> str:
    est = r["estimate"]
    lines = [f"# How many images per class? ({Path(r['data']).name})", "",
             f"Recipe: {', '.join(r['strategies_used'])}; {r['repeats']} random draws per size; each draw is "
             f"scored on every image not drawn. Target: {r['target']:.2%} balanced accuracy.", "",
             f"**Estimate: {est['statement']}.**", "",
             "| images per class | balanced accuracy (mean ± std) | worst draw |", "|---|---|---|"]
    lines += [f"| {s['shots']} | {s['mean']:.2%} ± {s['std']:.2%} | {s['min']:.2%} |" for s in r["sizes"]]
    if est.get("fit"):
        f = est["fit"]
        lines += ["", f"Fitted curve: accuracy(n) = {f['a']:.4f} - {f['b']:.4f} · n^(-{f['c']:.3f}); it levels "
                      f"off at {f['a']:.2%}."]
    check = r.get("extrapolation_check")
    if check:
        lines += ["", f"Check of the method on this data: fitted on {', '.join(map(str, check['fit_sizes']))} "
                      "images per class only, the curve predicted:"]
        lines += [f"- {p['size']} per class: {p['predicted']:.2%} predicted, {p['measured']:.2%} measured "
                  f"({p['error_points']:+.2f} points)" for p in check["predictions"]]
    lines += ["", "Per class (the rarest or hardest defect usually needs the most images):", "",
              "| class | recall at the largest size | images per class for the target |", "|---|---|---|"]
    for c, info in r["per_class"].items():
        last = list(info["mean_recall"].values())[-1]
        lines.append(f"| {c} | {last:.2%} | {info['statement']} |")
    lines += ["", "![learning curve](learning_curve.png)", "",
              f"Made by `lineside study sample-size` in {r['seconds']:.0f} s."]
    return "\n".join(lines) + "\n"


# --- compare ------------------------------------------------------------------------------

def compare(data, out: Path, cfg: TrainConfig, strategies=("linear", "finetune", "full", "scratch"), shots: int = 10,
            repeats: int = 3, views: int = STUDY_VIEWS, progress: bool = True) -> dict:
    t_start, out, study = _start(data, out, cfg, views, progress)
    d = study.data
    (shots,) = _check_shots(d, [shots])
    rows = []
    bar = tqdm(total=len(strategies) * repeats, desc="strategy comparison", unit="fit", disable=not progress)
    for r in range(repeats):
        drawn, rest = draw_per_class(d.y, shots, r)   # the same draw for every strategy: a paired comparison
        for s in strategies:
            row = _public(study.run_one(s, drawn, rest, r))
            rows.append(row)
            bar.set_postfix_str(f"{s} draw {r}: {row['balanced_accuracy']:.2%}")
            bar.update()
    bar.close()
    summary = {}
    for s in strategies:
        acc = np.array([x["balanced_accuracy"] for x in rows if x["requested"] == s])
        secs = np.array([x["train_s"] for x in rows if x["requested"] == s])
        summary[s] = {"mean": float(acc.mean()), "std": float(acc.std()), "train_s_mean": float(secs.mean()),
                      "train_s_total": float(secs.sum())}
    best = max(summary, key=lambda s: summary[s]["mean"])
    for s in strategies:   # paired differences against the best: same draws, so the spread is honest
        diff = np.array([a["balanced_accuracy"] - b["balanced_accuracy"]
                         for a in rows if a["requested"] == s
                         for b in rows if b["requested"] == best and b["seed"] == a["seed"]])
        summary[s]["vs_best_points"] = float(diff.mean() * 100)
        summary[s]["vs_best_std_points"] = float(diff.std() * 100)
        if "scratch" in summary and s != "scratch":
            summary[s]["time_saved_vs_scratch_s"] = summary["scratch"]["train_s_mean"] - summary[s]["train_s_mean"]
    result = {"study": "compare", "data": str(data), "classes": d.classes, "shots": shots, "repeats": repeats,
              "strategies": list(strategies), "best": best, "summary": summary, "runs": rows, "views": views,
              "seconds": round(time.perf_counter() - t_start, 1)}
    (out / "compare.json").write_text(json.dumps(result, indent=2))
    _plot_compare(result, out / "compare.png")
    (out / "report.md").write_text(_compare_report(result))
    return result


def _plot_compare(result: dict, path: Path):
    plt = _pyplot()

    names = result["strategies"]
    s = result["summary"]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(9, 3.6), dpi=110)
    ax.bar(names, [s[n]["mean"] * 100 for n in names], yerr=[s[n]["std"] * 100 for n in names], capsize=4,
           color=[f"C{i}" for i in range(len(names))])
    for i, n in enumerate(names):
        pts = [r["balanced_accuracy"] * 100 for r in result["runs"] if r["requested"] == n]
        ax.scatter([i] * len(pts), pts, color="k", s=8, zorder=3)
    low = min(r["balanced_accuracy"] for r in result["runs"]) * 100
    ax.set_ylim(max(0, low - 5), 100)
    ax.set_ylabel("balanced accuracy (%)")
    ax.set_title(f"{result['shots']} images per class, {result['repeats']} paired draws", fontsize=10)
    ax2.bar(names, [s[n]["train_s_mean"] for n in names], color=[f"C{i}" for i in range(len(names))])
    ax2.set_ylabel("training time per draw (s)")
    ax2.set_title("Training time", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _compare_report(r: dict) -> str:
    lines = [f"# Which recipe? ({Path(r['data']).name}, {r['shots']} images per class)", "",
             f"{r['repeats']} random draws; every recipe trains on the same draw and is scored on the same "
             "held-out images, so differences are paired.", "",
             "| recipe | balanced accuracy (mean ± std) | vs best (paired, points) | training time per draw | "
             "time saved vs scratch |", "|---|---|---|---|---|"]
    for n in r["strategies"]:
        s = r["summary"][n]
        saved = s.get("time_saved_vs_scratch_s")
        lines.append(f"| {n} | {s['mean']:.2%} ± {s['std']:.2%} | {s['vs_best_points']:+.2f} ± "
                     f"{s['vs_best_std_points']:.2f} | {s['train_s_mean']:.0f} s | "
                     f"{'-' if saved is None else f'{saved:.0f} s'} |")
    lines += ["", f"Best here: **{r['best']}**.", "", "![comparison](compare.png)", "",
              "`linear` times after its first draw exclude the frozen features, computed once and shared by "
              "every draw.", "", f"Made by `lineside study compare` in {r['seconds']:.0f} s."]
    return "\n".join(lines) + "\n"


# --- cross-validation ---------------------------------------------------------------------

def cross_validate(data, out: Path, cfg: TrainConfig, folds: int = 5, views: int = STUDY_VIEWS,
                   progress: bool = True) -> dict:
    t_start, out, study = _start(data, out, cfg, views, progress)
    d = study.data
    smallest = int(np.bincount(d.y, minlength=len(d.classes)).min())
    if not 2 <= folds <= smallest:
        raise LinesideError(f"--folds: {folds} needs 2 <= folds <= the smallest class ({smallest} images)")
    fold, _ = stratified_folds(d.y, cfg.seed, max_folds=folds, min_folds=folds)
    test_folds = [np.flatnonzero(fold == f) for f in range(folds)]
    pred = np.full(len(d.y), -1)
    probs = np.zeros((len(d.y), len(d.classes)), dtype=np.float32)
    fold_of = np.zeros(len(d.y), dtype=int)
    rows = []
    for f, test in enumerate(tqdm(test_folds, desc="cross-validation", unit="fold", disable=not progress)):
        train = np.setdiff1d(np.arange(len(d.y)), test)
        row = study.run_one(cfg.strategy, train, test, cfg.seed)
        pred[test], probs[test], fold_of[test] = row["_pred"], row["_probs"], f
        row = _public(row)
        row["fold"] = f
        rows.append(row)
    pooled = classification_report(d.y, pred, d.classes)
    wrong = [{"path": str(d.images.paths[i]), "true": d.classes[d.y[i]], "predicted": d.classes[pred[i]],
              "confidence": round(float(probs[i].max()), 4), "fold": int(fold_of[i])}
             for i in np.flatnonzero(pred != d.y)]
    wrong.sort(key=lambda w: -w["confidence"])   # confident mistakes first: the likeliest mislabels
    accs = np.array([r["balanced_accuracy"] for r in rows])
    result = {"study": "cv", "data": str(data), "classes": d.classes, "folds": folds,
              "strategy": cfg.strategy, "strategies_used": sorted({r["strategy"] for r in rows}),
              "per_fold": rows, "mean": float(accs.mean()), "std": float(accs.std()), "pooled": pooled,
              "misclassified": wrong, "seconds": round(time.perf_counter() - t_start, 1)}
    (out / "cv.json").write_text(json.dumps(result, indent=2))
    from .plots import plot_confusion

    plot_confusion(np.array(pooled["confusion_matrix"]), d.classes, out / "confusion_matrix.png",
                   f"{folds}-fold cross-validation (pooled)")
    (out / "report.md").write_text(_cv_report(result))
    return result


def _cv_report(r: dict) -> str:
    p = r["pooled"]
    lines = [f"# {r['folds']}-fold cross-validation ({Path(r['data']).name})", "",
             f"Recipe: {', '.join(r['strategies_used'])}. Every image is scored once, by the model that did not "
             "train on it.", "",
             f"Balanced accuracy per fold: {r['mean']:.2%} ± {r['std']:.2%}; pooled: {p['balanced_accuracy']:.2%} "
             f"({p['n']} images).", "", "| fold | balanced accuracy | train images | test images |", "|---|---|---|---|"]
    lines += [f"| {x['fold']} | {x['balanced_accuracy']:.2%} | {x['n_train']} | {x['n_eval']} |" for x in r["per_fold"]]
    lines += ["", "![confusion matrix](confusion_matrix.png)", "",
              f"{len(r['misclassified'])} images misclassified; the most confident mistakes are the first to check "
              "for a wrong label:", ""]
    lines += [f"- `{w['path']}`: labelled {w['true']}, predicted {w['predicted']} ({w['confidence']:.0%}, fold "
              f"{w['fold']})" for w in r["misclassified"][:20]]
    lines += ["", f"Made by `lineside study cv` in {r['seconds']:.0f} s."]
    return "\n".join(lines) + "\n"
