"""Labelled image sets: one folder per class (ImageFolder layout) or a CSV manifest.

Torch-free, so evaluation of exported models on the edge box can use it too.
"""

from __future__ import annotations

import csv
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import LinesideError
from .images import BadImage, image_size, is_image_file, read_image
from .spec import InputSpec, resize_to_spec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImageSet:
    """Image paths with integer labels indexing `classes`."""

    paths: tuple[Path, ...]
    targets: tuple[int, ...]
    classes: tuple[str, ...]
    root: Path

    def __len__(self) -> int:
        return len(self.paths)

    def counts(self) -> dict[str, int]:
        c = np.bincount(np.asarray(self.targets, dtype=int), minlength=len(self.classes))
        return {name: int(n) for name, n in zip(self.classes, c)}

    def subset(self, indices) -> "ImageSet":
        idx = [int(i) for i in indices]
        return ImageSet(tuple(self.paths[i] for i in idx), tuple(self.targets[i] for i in idx), self.classes, self.root)

    def write_manifest(self, path, indices=None) -> Path:
        """Write a `path,label` CSV naming these images (or the given subset)."""
        idx = range(len(self)) if indices is None else indices
        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["path", "label"])
            w.writerows([str(self.paths[i].resolve()), self.classes[self.targets[i]]] for i in idx)
        return Path(path)

    def fingerprint(self) -> str:
        """A short hash of relative paths, sizes and labels: which data a model saw."""
        import hashlib

        h = hashlib.sha256()
        for p, t in sorted(zip(self.paths, self.targets)):
            try:
                size = p.stat().st_size
            except OSError:
                size = -1
            h.update(f"{p.name}\0{size}\0{self.classes[t]}\n".encode())
        return h.hexdigest()[:16]


def load_image_set(path, classes: list[str] | None = None, min_classes: int = 2) -> ImageSet:
    """Open a class-per-folder directory or a `path,label` CSV manifest.

    With `classes` (a model's labels), targets index that list and a class the
    model does not know is an error; otherwise classes are the sorted folder names."""
    path = Path(path)
    if not path.exists():
        raise LinesideError(f"{path}: no such dataset folder or manifest")
    if path.is_file():
        if path.suffix.lower() != ".csv":
            raise LinesideError(f"{path}: a dataset is a folder with one sub-folder per class, or a .csv manifest")
        pairs = _read_manifest(path)
        root = path.parent
    else:
        pairs = _scan_folders(path)
        root = path
    found = sorted({label for _, label in pairs})
    if classes is None:
        classes = found
        if len(classes) < min_classes:
            raise LinesideError(
                f"{path}: found {len(classes)} class ({', '.join(classes)}); a classifier needs at least "
                f"{min_classes} classes, one sub-folder each"
            )
    else:
        unknown = [c for c in found if c not in classes]
        if unknown:
            raise LinesideError(
                f"{path}: class(es) {', '.join(unknown)} are not known to the model (it knows {', '.join(classes)})"
            )
    index = {c: i for i, c in enumerate(classes)}
    pairs.sort(key=lambda pl: (index[pl[1]], str(pl[0])))
    return ImageSet(tuple(p for p, _ in pairs), tuple(index[lbl] for _, lbl in pairs), tuple(classes), root)


ANOMALY_LABELS = ("good", "anomalous")


def as_good_and_anomalous(images: ImageSet, ok_classes) -> ImageSet:
    """The same images labelled for an anomaly model: the classes in `ok_classes` become
    "good", every other class "anomalous"."""
    ok = set(ok_classes)
    targets = tuple(0 if images.classes[t] in ok else 1 for t in images.targets)
    return ImageSet(images.paths, targets, ANOMALY_LABELS, images.root)


def load_for_model(path, labels, ok_classes=None) -> ImageSet:
    """A dataset labelled as a model answers: by its labels for a classifier; for an
    anomaly model (`ok_classes` given), the good classes as "good" and any other folder
    (a defect of any kind, named as the user likes) as "anomalous"."""
    if ok_classes is None:
        return load_image_set(path, classes=list(labels))
    return as_good_and_anomalous(load_image_set(path, min_classes=1), ok_classes)


def combine_sources(paths, out_manifest) -> Path:
    """Several datasets (folders or manifests) as one `path,label` manifest at out_manifest,
    for training on old data and newly reviewed frames together. An image listed by more
    than one source takes the label of the last (a correction overrides an old label).
    Written atomically, so that processes writing the same manifest never see half of one."""
    import io

    from .files import write_atomic

    labels: dict[Path, str] = {}
    for path in paths:
        images = load_image_set(path, min_classes=1)
        for p, t in zip(images.paths, images.targets):
            labels[p.resolve()] = images.classes[t]
    out_manifest = Path(out_manifest)
    out_manifest.parent.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["path", "label"])
    w.writerows([str(p), label] for p, label in labels.items())
    write_atomic(out_manifest, buf.getvalue().encode("utf-8"))
    return out_manifest


def _scan_folders(root: Path) -> list[tuple[Path, str]]:
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not class_dirs:
        loose = [p for p in root.iterdir() if p.is_file() and is_image_file(p)]
        hint = f" ({len(loose)} images lie directly in it)" if loose else ""
        raise LinesideError(f"{root}: no class folders found{hint}; expected one sub-folder per class")
    pairs = []
    for d in class_dirs:
        images = sorted(p for p in d.rglob("*") if p.is_file() and is_image_file(p))
        if not images:
            raise LinesideError(f"{d}: class folder '{d.name}' has no images")
        pairs += [(p, d.name) for p in images]
    return pairs


def _read_manifest(path: Path) -> list[tuple[Path, str]]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:   # -sig: Excel's byte-order mark
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise LinesideError(f"{path}: cannot read manifest ({exc})") from exc
    first = 1
    if rows and [c.strip().lower() for c in rows[0][:2]] == ["path", "label"]:
        rows, first = rows[1:], 2
    pairs = []
    for n, row in enumerate(rows, start=first):
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) < 2 or not row[0].strip() or not row[1].strip():
            raise LinesideError(f"{path}:{n}: expected 'path,label'")
        p = Path(row[0].strip())
        p = p if p.is_absolute() else path.parent / p
        if not p.is_file():
            raise LinesideError(f"{path}:{n}: image {p} does not exist")
        pairs.append((p, row[1].strip()))
    if not pairs:
        raise LinesideError(f"{path}: manifest lists no images")
    return pairs


def stratified_split(targets, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, val): `fraction` of each class to validation, at least one image
    per class on each side when the class has two or more."""
    targets = np.asarray(targets, dtype=int)
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(targets):
        idx = rng.permutation(np.flatnonzero(targets == c))
        n_val = int(round(fraction * len(idx)))
        n_val = min(max(n_val, 1 if len(idx) >= 2 and fraction > 0 else 0), len(idx) - 1)
        val += idx[:n_val].tolist()
        train += idx[n_val:].tolist()
    return np.sort(np.array(train, dtype=int)), np.sort(np.array(val, dtype=int))


def draw_per_class(targets, k: int, seed: int, factors: dict[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Indices (drawn, rest): k images of every class drawn at random (k * factors[c] of
    class c, for an imbalanced draw), the rest held out."""
    targets = np.asarray(targets, dtype=int)
    rng = np.random.default_rng(seed)
    drawn = []
    for c in np.unique(targets):
        idx = np.flatnonzero(targets == c)
        n = k * (factors or {}).get(int(c), 1)
        if len(idx) <= n:
            raise LinesideError(f"class {c} has {len(idx)} images; cannot draw {n} and keep some for evaluation")
        drawn += rng.choice(idx, size=n, replace=False).tolist()
    drawn = np.sort(np.array(drawn, dtype=int))
    rest = np.setdiff1d(np.arange(len(targets)), drawn)
    return drawn, rest


def scores_over_draws(targets, k: int, repeats: int, fit_predict) -> list[float]:
    """Balanced accuracy (percent) of `fit_predict(drawn, rest) -> labels of rest` for
    draws 0..repeats-1 of k images per class, each scored on every image not drawn."""
    from .metrics import classification_report

    y = np.asarray(targets)
    labels = [str(c) for c in range(int(y.max()) + 1)]
    out = []
    for seed in range(repeats):
        drawn, rest = draw_per_class(targets, k, seed)
        out.append(100 * classification_report(y[rest], fit_predict(drawn, rest), labels)["balanced_accuracy"])
    return out


def load_arrays(images: ImageSet, spec: InputSpec, skip_bad: bool = False, progress: bool = True,
                desc: str = "reading images"):
    """Read and resize every image -> (uint8 array N x H x W x 3, kept ImageSet, bad paths).

    A bad image is an error naming the file unless skip_bad, which warns and counts."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    def read(path):
        try:
            return resize_to_spec(read_image(path), spec), None
        except BadImage as exc:
            return None, exc

    arrays, keep, bad = [], [], []
    # OpenCV decodes and resizes without the GIL: a thread per core reads in parallel, in order.
    pool = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1))
    try:
        done = pool.map(read, images.paths)
        for i, (array, exc) in enumerate(tqdm(done, total=len(images.paths), desc=desc, unit="img",
                                              disable=not progress, leave=False)):
            if exc is None:
                arrays.append(array)
                keep.append(i)
                continue
            if not skip_bad:
                raise LinesideError(f"{exc} (pass --skip-bad to skip unreadable images)") from exc
            log.warning("skipping %s", exc)
            bad.append(str(images.paths[i]))
    finally:
        pool.shutdown(cancel_futures=True)
    if not arrays:
        raise LinesideError(f"{images.root}: no readable images")
    return np.stack(arrays), images.subset(keep), bad


def image_sizes(paths, limit: int = 64) -> list[tuple[int, int]]:
    """(height, width) of up to `limit` images, read from their headers where possible."""
    out = []
    for p in list(paths)[:limit]:
        try:
            size = image_size(Path(p).read_bytes()[:65536])
        except OSError:
            size = None
        if size is None:
            try:
                size = read_image(p).shape[:2]
            except LinesideError:
                continue
        out.append(tuple(int(v) for v in size))
    return out


def typical_size(paths, limit: int = 64) -> list[int] | None:
    """[height, width]: the median of up to `limit` images' sizes; None when none reads."""
    sizes = image_sizes(paths, limit)
    if not sizes:
        return None
    return [int(np.median([s[0] for s in sizes])), int(np.median([s[1] for s in sizes]))]
