"""Training on the images nobody labelled (`lineside train DATA --unlabelled FOLDER`).

Two uses, each taken only when cross-validation on the labelled images says it helps
(and the metrics say why either way):

self-training  (a linear head on frozen features) the head labels the unlabelled images
               it is surest of, the same number for every class (so a folder of mostly
               good parts does not swamp the defects), and is fitted again with them, in
               SELF_TRAIN_ROUNDS rounds of more images each. Compared with the head
               fitted on the labelled images alone over folds of the labelled images.
good parts     (data with a good class) the unlabelled images the classifier calls good
               become an anomaly model of good parts; a small layer reads the
               classifier's logits with the image's distance to them
               (good_parts.GoodPartsClassifier), in one of two forms: the distance
               alone decides good or defective (split), or the two are weighed together
               (stack). Fitted on the logits of images the classifier did not train on
               (out of fold, or the validation images); the form, and whether to use
               the layer at all, by cross-validation on them.

Measured on NEU and elpv with benchmarks/unlabelled.py (docs/unlabelled.md).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np
import torch

from lineside.dataset import ImageSet, load_arrays
from lineside.errors import LinesideError
from lineside.images import is_image_file
from lineside.metrics import balanced_accuracy

from .calibrate import stratified_folds
from .heads import fit_linear_head
from .trainer import fit_head_on, score, view_features

log = logging.getLogger(__name__)

MAX_UNLABELLED = 5000    # images read from --unlabelled (a seeded sample beyond that, said in the metrics)
SELF_TRAIN_ROUNDS = 3    # each round labels up to SELF_TRAIN_PER_ROUND x (round) x (smallest class) images per class
SELF_TRAIN_PER_ROUND = 5
MIN_GOOD = 8             # unlabelled images called good that a bank of good parts needs
GOOD_PARTS_SCORER = "both"   # the good parts' scorer (train/anomaly.py's SCORERS)
MAX_GOOD = 1000          # of them, the most the bank is built from (a seeded sample beyond that)
STACK_L2 = 1e-2          # the good-parts layer's L2 on standardised inputs (a few inputs, few rows)
LAYER_CV_REPEATS = 3     # the layer's two forms compared over this many dealings into folds
LAYER_FORMS = (True, False)   # split, then stack: the forms compared, a tie taking the first
FOLDS = 5


def read_unlabelled(folder, spec, seed: int, progress: bool) -> tuple[np.ndarray, list[Path], dict]:
    """Every image under `folder` (sub-folders too: a run's saved frames), at `spec`'s size,
    at most MAX_UNLABELLED (a seeded sample): the images, their paths, and a report.
    Unreadable files are skipped and counted."""
    root = Path(folder)
    paths = unlabelled_paths(root)
    found = len(paths)
    if found > MAX_UNLABELLED:
        keep = np.sort(np.random.default_rng(seed).choice(found, MAX_UNLABELLED, replace=False))
        paths = [paths[i] for i in keep]
    images = ImageSet(tuple(paths), (0,) * len(paths), ("unlabelled",), root)
    x, kept, bad = load_arrays(images, spec, skip_bad=True, progress=progress, desc="reading unlabelled images")
    return x, list(kept.paths), {"folder": str(root.resolve()), "found": found, "used": len(kept),
                                 "unreadable": len(bad)}


def unlabelled_paths(folder) -> list[Path]:
    """The image files under `folder`, sorted; a one-line error when there are none."""
    root = Path(folder)
    if not root.is_dir():
        raise LinesideError(f"--unlabelled {folder}: not a folder")
    paths = sorted(p for p in root.rglob("*") if p.is_file() and is_image_file(p))
    if not paths:
        raise LinesideError(f"--unlabelled {folder}: no image files in it")
    return paths


# -- self-training of a linear head ----------------------------------------------------

def balanced_pseudo_labels(probs: np.ndarray, cap: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows and labels: for every class the unlabelled images predicted as it, surest
    first, the same number for each (the smallest class's count, at most `cap`)."""
    label, conf = probs.argmax(1), probs.max(1)
    picked = [np.flatnonzero(label == c) for c in range(probs.shape[1])]
    n = min(cap, *(len(p) for p in picked))
    rows = np.concatenate([p[np.argsort(-conf[p], kind="stable")][:n] for p in picked])
    return rows, label[rows]


def self_train(fit, feats: torch.Tensor, y: np.ndarray, u_feats: torch.Tensor, smallest: int, repeat: int):
    """A head fitted by `fit(feats, y)` (-> a callable giving logits), then again with the
    unlabelled rows it labels (balanced_pseudo_labels), each added `repeat` times (as many
    rows as a labelled image has views), SELF_TRAIN_ROUNDS rounds. Returns the last head
    and the unlabelled rows it was fitted with (features, labels; once each)."""
    head, added = fit(feats, y), (u_feats[:0], np.zeros(0, np.int64))
    for r in range(1, SELF_TRAIN_ROUNDS + 1):
        with torch.no_grad():
            probs = torch.softmax(head(u_feats), 1).cpu().numpy()
        rows, labels = balanced_pseudo_labels(probs, SELF_TRAIN_PER_ROUND * smallest * r)
        if not len(rows):
            break
        extra = u_feats[torch.from_numpy(rows)].repeat(repeat, 1)
        head = fit(torch.cat([feats, extra]), np.concatenate([y, np.tile(labels, repeat)]))
        added = (u_feats[torch.from_numpy(rows)], labels.astype(np.int64))
    return head, added


def self_train_linear(run, result, u_feats: torch.Tensor) -> dict:
    """Self-training of the linear recipe's head (result.linear_bank holds the labelled
    rows), kept when it is no worse than the labelled images alone over folds of them."""
    model = result.model
    bank, bank_y, n = result.linear_bank[:3]
    repeat = len(bank) // n
    classes = len(run.classes)
    smallest = int(np.bincount(bank_y[:n], minlength=classes).min())
    frozen = len(model.stages)

    def fit(feats, y):
        head = torch.nn.Linear(feats.shape[1], classes).to(run.device)
        fit_head_on(run, model, head, feats.to(run.device).float(), y, frozen)
        return head

    u = u_feats.to(run.device)
    alone, with_u = _folds_compared(fit, bank, bank_y, n, u, smallest, repeat, run.cfg.seed)
    report = {"method": "self-training", "cv_labelled_only": round(alone, 4), "cv_with_unlabelled": round(with_u, 4)}
    if with_u < alone:
        report["used"] = False
        report["why"] = (f"self-training scored {with_u:.1%} in cross-validation on the labelled images, the "
                         f"labelled images alone {alone:.1%}: not used")
        return report
    head, (_, labels) = self_train(fit, bank.float(), bank_y, u, smallest, repeat)
    if not len(labels):
        report["used"] = False
        report["why"] = "the head called no unlabelled image one of the classes: nothing to learn from, not used"
        return report
    with torch.no_grad():
        model.head.weight.copy_(head.weight)
        model.head.bias.copy_(head.bias)
    # calibration's folds self-train too, each from its own head (trainer.out_of_fold_on_bank): with
    # the rows this head labelled, a fold would learn from labels its held-out images helped choose
    result.linear_bank = (*result.linear_bank[:3], lambda feats, y: self_train(
        fit, feats, y, u, max(1, int(np.bincount(y, minlength=classes).min()) // repeat), repeat)[0])
    report.update(used=True, pseudo_labelled=int(len(labels)),
                  why=f"self-training scored {with_u:.1%} in cross-validation on the labelled images, the labelled "
                      f"images alone {alone:.1%}: the head is fitted again with {len(labels)} unlabelled image(s) "
                      f"it labelled ({len(labels) // len(run.classes)} per class)")
    return report


def _folds_compared(fit, bank, bank_y, n, u, smallest, repeat, seed) -> tuple[float, float]:
    """Balanced accuracy over folds of the labelled images of the head fitted on the other
    folds' rows, alone and self-trained; each held-out image is judged by its first
    view's row (the image as it is)."""
    y = bank_y[:n]
    fold, k = stratified_folds(y, [seed, 7], FOLDS)
    if k < 2:
        return 0.0, 0.0
    tiled = np.tile(np.arange(n), repeat)
    alone, with_u = np.empty(n, int), np.empty(n, int)
    for f in range(k):
        keep = torch.from_numpy(np.flatnonzero(fold[tiled] != f))
        held = torch.from_numpy(np.flatnonzero(fold == f))
        feats = bank[keep].float()
        base = fit(feats, bank_y[keep.numpy()])
        st = self_train(fit, feats, bank_y[keep.numpy()], u, max(1, smallest - smallest // k), repeat)[0]
        with torch.no_grad():
            x = bank[held].float().to(u.device)
            alone[held.numpy()] = base(x).argmax(1).cpu().numpy()
            with_u[held.numpy()] = st(x).argmax(1).cpu().numpy()
    return balanced_accuracy(y, alone), balanced_accuracy(y, with_u)


# -- the good parts' memory bank ---------------------------------------------------------

def fit_stack(inputs: np.ndarray, y: np.ndarray, classes: int) -> torch.nn.Linear:
    """The good-parts layer's stack form: a multinomial logistic regression on standardised inputs, the
    scaling folded back into it. Classes weighed alike."""
    head = torch.nn.Linear(inputs.shape[1], classes)
    counts = np.bincount(y, minlength=classes).astype(np.float64)
    weight = torch.tensor(counts.sum() / (classes * np.maximum(counts, 1)), dtype=torch.float32)
    fit_linear_head(head, torch.from_numpy(inputs).float(), torch.from_numpy(y).long(), STACK_L2, True, weight,
                    max_iter=500)
    return head


def fit_split(inputs: np.ndarray, y: np.ndarray, classes: int, ok: int) -> torch.nn.Linear:
    """The split form of the layer (GoodPartsClassifier.split): good against any defect from
    the distance alone (a logistic regression on it, the two sides weighed alike), written
    as the layer's head: the good class reads the distance, the defects nothing (their
    logits are the classifier's, among the defects)."""
    binary = fit_stack(inputs[:, -1:], (y == ok).astype(np.int64), 2)
    head = torch.nn.Linear(inputs.shape[1], classes)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.weight[ok, -1] = binary.weight[1, 0] - binary.weight[0, 0]
        head.bias[ok] = binary.bias[1] - binary.bias[0]
    return head


def fit_layer(inputs: np.ndarray, y: np.ndarray, classes: int, ok: int, split: bool) -> torch.nn.Linear:
    return fit_split(inputs, y, classes, ok) if split else fit_stack(inputs, y, classes)


def apply_layer(head: torch.nn.Linear, inputs: np.ndarray, ok: int, split: bool) -> np.ndarray:
    from .good_parts import layer_logits

    with torch.no_grad():
        return layer_logits(head, torch.from_numpy(inputs).float(), split, ok).numpy()


def stack_out_of_fold(inputs: np.ndarray, y: np.ndarray, classes: int, seed: int, ok: int = 0,
                      split: bool = False, repeat: int = 0) -> np.ndarray | None:
    """Logits of each row from a good-parts layer (the stack, or the split form) fitted
    without it, on the `repeat`-th way of dealing the rows into folds (None: too few rows)."""
    fold, k = stratified_folds(y, [seed, 11, repeat] if repeat else [seed, 11], FOLDS)
    if k < 2:
        return None
    out = np.zeros((len(y), classes), np.float32)
    for f in range(k):
        head = fit_layer(inputs[fold != f], y[fold != f], classes, ok, split)
        out[fold == f] = apply_layer(head, inputs[fold == f], ok, split)
    return out


def choose_layer(inputs: np.ndarray, y: np.ndarray, classes: int, ok: int,
                 seed: int) -> tuple[bool, dict, np.ndarray | None, float]:
    """The form of the layer: the split (the distance alone decides good or defective) or
    the stack (every logit and the distance weighed together), by balanced accuracy out of
    fold, averaged over LAYER_CV_REPEATS ways of dealing the rows into folds; a tie takes
    the split. Measured on six elpv draws (docs/unlabelled.md): the stack's weights for
    the classifier's logits, fitted on its out-of-fold logits, carried badly to the
    classifier fitted on every image. Returns split, each form's score, and the chosen
    form's out-of-fold logits (its first dealing; None when there are too few rows) and
    its score."""
    scores, first = {}, {}
    for split in LAYER_FORMS:
        oofs = [stack_out_of_fold(inputs, y, classes, seed, ok, split, r) for r in range(LAYER_CV_REPEATS)]
        if oofs[0] is None:
            return False, {}, None, 0.0
        scores[split] = float(np.mean([balanced_accuracy(y, o.argmax(1)) for o in oofs]))
        first[split] = oofs[0]
    split = max(scores, key=scores.get)      # the first of equals: LAYER_FORMS's order
    forms = {f"cv_{'split' if form else 'stack'}": round(v, 4) for form, v in scores.items()}
    return split, forms, first[split], scores[split]


def keeps_good_parts(alone: float, with_good: float) -> bool:
    """The rule: the layer is kept when its cross-validated balanced accuracy is no lower
    (as self-training is): with 10 labelled images per class a tie is common, and on elpv
    (draw 0 of docs/unlabelled.md, both 80.0%) the layer scored 80.8% on the scored half
    against 77.0% without it; breaking the tie by the log-loss at the best temperature
    would have left it out there."""
    return with_good >= alone


def good_parts(run, model, held: tuple[np.ndarray, np.ndarray, np.ndarray], x_unl: np.ndarray,
               ok: int, u_feats: torch.Tensor | None = None) -> tuple[object | None, np.ndarray | None, dict]:
    """The classifier with the good parts among the unlabelled images (an anomaly model of
    them, train/anomaly.py's default scorer), when it does no worse than the classifier
    alone in cross-validation on `held` (images the classifier did not
    train on: their uint8 images, logits and labels). `u_feats`: the unlabelled images'
    view_features when the model is a linear head on them (its answers without another
    pass). Returns the new model (None when not used), the rows' out-of-fold logits under
    it, and the report."""
    from .anomaly import anomaly_scores, fit_anomaly
    from .good_parts import GoodPartsClassifier

    x_held, logits, y = held
    if u_feats is not None:
        with torch.no_grad():
            answers = model.head(u_feats.to(run.device)).cpu().numpy()
    else:
        answers = score(model, x_unl, run.device)
    good = np.flatnonzero(answers.argmax(1) == ok)
    report = {"method": "good parts", "good_class": run.classes[ok], "unlabelled_called_good": int(len(good))}
    if len(good) > MAX_GOOD:
        good = np.sort(np.random.default_rng(run.cfg.seed).choice(good, MAX_GOOD, replace=False))
    if len(good) < MIN_GOOD:
        return None, None, {**report, "used": False,
                            "why": f"{len(good)} unlabelled image(s) called {run.classes[ok]} (a bank needs {MIN_GOOD})"}
    cfg = run.cfg
    weights = cfg.weights if cfg.weights not in ("none",) else "imagenet"
    fit = fit_anomaly(x_unl[good], run.spec, cfg.backbone, weights, seed=cfg.seed, device=run.device,
                      scorer=GOOD_PARTS_SCORER)
    scorer = fit.model
    scorer.threshold.fill_(1.0)
    report["scorer"] = fit.info["scorer"]
    inputs = np.concatenate([logits, np.log(np.maximum(anomaly_scores(scorer, x_held, run.device), 1e-6))[:, None]],
                            1).astype(np.float32)
    classes = len(run.classes)
    split, forms, oof, with_good = choose_layer(inputs, y, classes, ok, cfg.seed)
    alone = balanced_accuracy(y, logits.argmax(1))
    form = "split" if split else "stack"
    report.update(cv_classifier_alone=round(alone, 4), cv_with_good_parts=round(with_good, 4), layer=form, **forms)
    scores = f"{with_good:.1%} in cross-validation against {alone:.1%} for the classifier alone"
    if not keeps_good_parts(alone, with_good):
        return None, None, {**report, "used": False, "why": f"with the good parts {scores}: not used"}
    hybrid = GoodPartsClassifier(model, scorer, ok, split=split).to(run.device).eval()
    hybrid.head.load_state_dict(fit_layer(inputs, y, classes, ok, split).state_dict())
    other = forms.get("cv_stack" if split else "cv_split")
    how = ("the distance to them deciding good or defective" if split else
           "the distance to them weighed with the classifier's logits")
    instead = "" if other is None else (f" (weighed with the classifier's logits instead: {other:.1%})" if split
                                        else f" (the distance alone deciding: {other:.1%})")
    return hybrid, oof, {**report, "used": True,
                         "why": f"with the {len(good)} unlabelled images called {run.classes[ok]} as good "
                                f"parts, {how}: {with_good:.1%} in cross-validation{instead} against "
                                f"{alone:.1%} for the classifier alone"}


class UnlabelledSteps:
    """--unlabelled in a training run: the images read once, then self_train (after the
    recipe) and good_parts (after calibration, which it replaces when the layer is used).
    What each did goes to result.unlabelled (metrics.json's "unlabelled")."""

    def __init__(self, run, result, data, folder, ok_classes=None):
        self.run, self.result, self.d = run, result, data
        self.x, _, info = read_unlabelled(folder, run.spec, run.cfg.seed, run.progress)
        self.ok = good_class(run.classes, ok_classes)
        self.u_feats = None       # the unlabelled images' features when the model is a linear head on them
        result.unlabelled = self.report = {**info, "steps": []}

    def self_train(self) -> None:
        r = self.result
        if r.linear_bank is None:
            step = {"method": "self-training", "used": False,
                    "why": f"the {r.plan.strategy} recipe trains the network; self-training refits a linear head only"}
        else:
            self.u_feats = view_features(r.model, self.x, self.run.device)
            step = self_train_linear(self.run, r, self.u_feats)
        self._log(step)

    def good_parts(self, calibration: dict | None) -> dict | None:
        run, d = self.run, self.d
        if self.ok is None:
            self._log({"method": "good parts", "used": False,
                       "why": "no good class among the labels (name it with --ok-classes)"})
            return calibration
        if d.x_val is not None:
            held = (d.x_val, score(self.result.model, d.x_val, run.device, logits=True), d.y_val)
            source = f"the {len(d.y_val)} validation images (the layer is fitted on them: cross-validated)"
        elif calibration and calibration["source"].startswith("out-of-fold"):
            held = (d.x_train, np.asarray(calibration["_logits"], np.float32), np.asarray(calibration["_y"]))
            source = f"out-of-fold predictions of the {len(d.y_train)} training images (the good-parts layer's folds)"
        else:
            self._log({"method": "good parts", "used": False,
                       "why": "no images the classifier did not train on to fit the layer on (calibration is off "
                              "or the classes are too small for folds)"})
            return calibration
        hybrid, oof, step = good_parts(run, self.result.model, held, self.x, self.ok, self.u_feats)
        self._log(step)
        if hybrid is None:
            return calibration
        from .calibrate import calibration_report

        self.result.model = hybrid
        report = calibration_report(oof, held[2], source)
        with torch.no_grad():
            hybrid.head.weight.div_(report["temperature"])
            hybrid.head.bias.div_(report["temperature"])
        return report

    def _log(self, step: dict) -> None:
        self.report["steps"].append(step)
        log.info("--unlabelled, %s: %s", step["method"], step["why"])
        if self.run.progress:
            from tqdm import tqdm

            tqdm.write(f"unlabelled images, {step['method']}: {step['why']}", file=sys.stderr)


def good_class(classes, ok_classes) -> int | None:
    """The index of the good class (--ok-classes, else the one named good, ok, functional,
    normal, ...: anomaly_run.DEFAULT_OK); None when there is none."""
    from .anomaly_run import default_ok, ok_classes_of

    if not ok_classes and default_ok(classes) is None:
        return None
    names = ok_classes_of(list(classes), ok_classes)
    if len(names) > 1:
        raise LinesideError(f"--ok-classes: --unlabelled takes one good class (given {', '.join(names)})")
    return list(classes).index(names[0])
