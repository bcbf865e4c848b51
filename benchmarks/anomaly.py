"""Anomaly detection from good images alone: image AUROC, the false-reject rate measured
on good images the model never saw against the rate it promised, time to train and
frames per second, on MVTec AD bottle and elpv (functional cells as the good class),
over several draws of the good training images, against the plain recipe (the same
frozen EfficientNet-Lite0 patch features of stages 3 and 5, every training patch in the
bank, no smoothing, no channel weighting, the image squeezed to 256x256).

    python benchmarks/anomaly.py bottle --goods 8,209 --draws 3
    python benchmarks/anomaly.py elpv --goods 32,200 --draws 3

`bottle` is ../shared/datasets/mvtec-bottle (train/good for training; test/ with good
and defect folders for testing); `elpv` trains on `good`-many functional cells and tests
on the rest of them and on every defective cell. Other datasets: a folder with a `good`
(or --ok) class and defect classes, split the same way as elpv.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_data import open_benchmark_data  # noqa: E402

from lineside.dataset import load_arrays, load_image_set  # noqa: E402
from lineside.train import anomaly as A  # noqa: E402
from lineside.train.backbones import BACKBONES  # noqa: E402

TEST_LIMIT = 0   # --test-limit: score at most about this many test images (0: all)
BOTTLE = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "mvtec-bottle"


def split(name: str, ok: str, n_good: int, seed: int):
    """(train paths, test paths, test labels: 1 = defect)."""
    if name == "bottle":
        train = load_image_set(BOTTLE / "train", min_classes=1)
        test = load_image_set(BOTTLE / "test")
        rng = np.random.default_rng(seed)
        idx = rng.permutation(len(train))[:n_good]
        good = test.classes.index("good")
        return ([train.paths[i] for i in sorted(idx)], list(test.paths),
                np.array([t != good for t in test.targets], int))
    data = open_benchmark_data(name)
    okc = data.classes.index(ok)
    targets = np.asarray(data.targets)
    goods = np.flatnonzero(targets == okc)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(goods)
    train, rest = perm[:n_good], perm[n_good:]
    bad = np.flatnonzero(targets != okc)
    if TEST_LIMIT:   # a seeded share of the test images, the good and the defective alike
        keep = TEST_LIMIT / (len(rest) + len(bad))
        rest = np.sort(rng.permutation(rest)[:max(1, round(len(rest) * keep))])
        bad = np.sort(rng.permutation(bad)[:max(1, round(len(bad) * keep))])
    test = np.concatenate([rest, bad])
    return [data.paths[i] for i in train], [data.paths[i] for i in test], (targets[test] != okc).astype(int)


def read(paths, spec):
    from lineside.dataset import ImageSet

    s = ImageSet(tuple(paths), tuple([0] * len(paths)), ("x",), Path("."))
    return load_arrays(s, spec, progress=False)[0]


def image_hw(paths):
    import cv2

    out = []
    for p in paths[:50]:
        im = cv2.imread(str(p), cv2.IMREAD_UNCHANGED)
        out.append(im.shape[:2])
    return out


def one(name, ok, n_good, seed, cfg):
    train_paths, test_paths, y = split(name, ok, n_good, seed)
    base = BACKBONES.get("efficientnet_lite0").input_spec
    spec = (replace(base, height=256, width=256) if cfg["plain"]
            else A.spec_for(image_hw(train_paths), base, cfg["short"]))
    xg, xt = read(train_paths, spec), read(test_paths, spec)
    t0 = time.perf_counter()
    if cfg["plain"]:
        fit = plain_fit(xg, spec, cfg)
    else:
        fit = A.fit_anomaly(xg, spec, taps=cfg["taps"], bank_size=cfg["bank"], false_reject=cfg["fr"], seed=seed,
                            project=cfg["project"], scorer=cfg["scorer"])
    seconds = time.perf_counter() - t0
    scores = A.anomaly_scores(fit.model, xt)
    thr = float(fit.model.threshold)
    good = y == 0
    fr = float((scores[good] > thr).mean())
    det = float((scores[~good] > thr).mean()) if (~good).any() else None
    fps = frames_per_second(fit.model, xt[:1])
    exported = exported_fps(fit.model, spec) if cfg.get("exported_fps") and seed == 0 and not cfg["plain"] else None
    return {"exported": exported, "auroc": 100 * A.auroc(y, scores), "false_reject": fr, "detection": det,
            "promised": cfg["fr"], "interval": fit.info.get("false_reject_expected", {}).get("interval_90"),
            "train_s": seconds, "torch_fps": fps, "size": f"{spec.height}x{spec.width}", "n_test_good": int(good.sum())}


def plain_fit(xg, spec, cfg):
    """The plain recipe: every patch in the bank, no weighting, no smoothing (threshold:
    the largest training score, which it has no better way to set)."""
    from lineside.train.backbones import build_backbone
    from lineside.train.model import stage_widths

    _, net = build_backbone("efficientnet_lite0")
    widths = stage_widths(net)
    dim = sum(widths[t] for t in cfg["taps"])
    model = A.AnomalyModel(net.stages, spec, cfg["taps"], dim, 1).eval()
    feats = A.extract(model, xg, "cpu")
    flat = feats.reshape(-1, dim)
    model.bank = flat.clone()
    model.bank_sq = (flat * flat).sum(1)
    model.raw_map = lambda x: model.distances(model.patch_features(x))   # no smoothing
    model.threshold.fill_(1.0)
    return A.AnomalyFit(model, {})


def exported_fps(model, spec, seconds: float = 3.0) -> dict:
    """Frames per second of the exported anomaly model (OpenVINO FP32, one request: the
    camera loop's latency engine), next to the default classifier's (EfficientNet-Lite0 at
    224x224, one view) exported the same way, in the same run."""
    import tempfile

    from lineside.export.onnx_export import export_onnx
    from lineside.export.openvino_export import export_openvino
    from lineside.metadata import ModelMetadata
    from lineside.runtime.bench import raw_fps
    from lineside.runtime.model import open_model
    from lineside.train.backbones import build_backbone
    from lineside.train.model import Classifier, stage_widths

    base = BACKBONES.get("efficientnet_lite0").input_spec
    _, net = build_backbone("efficientnet_lite0")
    clf = Classifier(net, stage_widths(net)[-1], 2, base).eval()
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, m, sp, anomaly in (("anomaly", model, spec, True), ("classifier", clf, base, False)):
            meta = ModelMetadata(labels=("good", "anomalous"), spec=sp, anomaly={
                "threshold": float(model.threshold), "ok_classes": ["good"], "score_output": "anomaly_score",
                "map_output": "anomaly_map"} if anomaly else None)
            onnx = export_onnx(m, sp.height, sp.width, Path(tmp) / f"{name}.onnx", meta)
            xml = export_openvino(onnx, Path(tmp) / f"{name}.xml", meta)
            rm = open_model(xml, backend="openvino")
            fps = raw_fps(rm, seconds, "latency")
            out[name] = {"fps": round(fps, 1), "ms": round(1000 / fps, 2), "input": f"{sp.height}x{sp.width}"}
            if anomaly:   # the heatmap an NG frame costs on top: the model's other outputs and the overlay
                from lineside.heatmap import overlay

                x = np.zeros((1, sp.height, sp.width, 3), np.uint8)
                rm.anomaly(x)
                t0, n = time.perf_counter(), 0
                while time.perf_counter() - t0 < 1.0:
                    _, maps = rm.anomaly(x)
                    overlay(x[0], maps[0])
                    n += 1
                out[name]["heatmap_ms"] = round(1000 * (time.perf_counter() - t0) / n, 2)
    out["ratio"] = round(out["anomaly"]["fps"] / out["classifier"]["fps"], 2)
    return out


def frames_per_second(model, x1, seconds=1.0):
    with torch.no_grad():
        t = A.to_input(x1, "cpu")
        model(t)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            model(t)
            n += 1
    return n / (time.perf_counter() - t0)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", help="bottle, elpv, or a dataset folder")
    p.add_argument("--ok", default=None, help="the good class (default: good; functional for elpv)")
    p.add_argument("--goods", default="8,209")
    p.add_argument("--draws", type=int, default=3)
    p.add_argument("--taps", default="3,5")
    p.add_argument("--short", type=int, default=256)
    p.add_argument("--bank", type=int, default=A.DEFAULT_BANK)
    p.add_argument("--false-reject", type=float, default=A.DEFAULT_FALSE_REJECT)
    p.add_argument("--project", type=int, default=A.DEFAULT_PROJECT,
                   help="principal axes the patch features are mapped on (0: none)")
    p.add_argument("--scorer", default=A.DEFAULT_SCORER, choices=A.SCORERS,
                   help="how a patch is judged: the bank, a Gaussian per position, or both")
    p.add_argument("--plain", action="store_true", help="the plain recipe only")
    p.add_argument("--fps", action="store_true",
                   help="also export the first draw's model and time it in OpenVINO against the classifier")
    p.add_argument("--test-limit", type=int, default=0,
                   help="score about this many of the test images (a seeded draw, good and defective in "
                        "proportion): the plain recipe's bank of every patch scores elpv at a few images a second")
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    global TEST_LIMIT
    TEST_LIMIT = a.test_limit
    torch.set_num_threads(max(1, torch.get_num_threads()))
    ok = a.ok or ("functional" if a.data == "elpv" else "good")
    cfg = {"taps": tuple(int(t) for t in a.taps.split(",")), "short": a.short, "bank": a.bank,
           "fr": a.false_reject, "plain": a.plain, "exported_fps": a.fps,
           "project": a.project, "scorer": a.scorer}
    rows = []
    for n in (int(v) for v in a.goods.split(",")):
        draws = 1 if (a.data == "bottle" and n >= 209) else a.draws
        res = [one(a.data, ok, n, seed, cfg) for seed in range(draws)]
        auc = [r["auroc"] for r in res]
        row = {"data": a.data, "goods": n, "draws": draws, "recipe": "plain" if a.plain else "lineside",
               "config": {k: v for k, v in cfg.items() if k not in ("plain", "exported_fps")},
               "auroc_mean": float(np.mean(auc)), "auroc_each": auc,
               "false_reject_measured": [r["false_reject"] for r in res],
               "detection": [r["detection"] for r in res],
               "promised_interval_90": [r["interval"] for r in res],
               "train_seconds": [round(r["train_s"], 1) for r in res],
               "torch_fps": round(float(np.mean([r["torch_fps"] for r in res])), 1),
               "input": res[0]["size"], "test_goods": res[0]["n_test_good"], "exported": res[0]["exported"]}
        rows.append(row)
        if not a.json:
            print(f"{a.data} {n} good x{draws} ({row['recipe']}, {row['input']}): AUROC {row['auroc_mean']:.1f} "
                  f"{['%.1f' % v for v in auc]}; false reject {['%.3f' % v for v in row['false_reject_measured']]} "
                  f"(promised {a.false_reject}); detection {row['detection']}; train {row['train_seconds']} s; "
                  f"{row['torch_fps']} FPS torch; exported {row['exported']}", flush=True)
    if a.json:
        print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
