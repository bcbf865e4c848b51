#!/usr/bin/env python
"""Where ONNX Runtime's INT8 loses accuracy: the features the head reads, FP32 against
several ways of quantizing the same FP32 model, and the throughput each runs at.

For a run kept by `benchmarks/int8_gate.py --keep DIR` (run_K_S, bundle_K_S, train_K_S.csv
and rest_K_S.csv), the bundle's FP32 ONNX is quantized on its training images (each with
its three flips, at most 120, as the export calibrates) in these ways:

- qoperator: the shipped recipe (lineside/export/quantize.py, ORT_RECIPES) without its
  first block in float (the previous recipe);
- qoperator-nncf-ranges: the same, with every activation range NNCF chose;
- qoperator-nncf-biases: the same, with NNCF's bias correction instead of lineside's;
- qoperator-depthwise-float: the same with every depthwise convolution in float;
- qoperator-first-block-float: the same with the stem and the first depthwise
  convolution in float (first_block_convs): the shipped recipe;
- nncf-qdq: NNCF's ONNX backend (QDQ), the nodes of `qoperator` in float, per-tensor activations.

Each is scored by the mean error of the features tensor (the input of the head's view
mean) against FP32, per feature in units of that feature's spread over the images, on up
to 200 images not drawn; the bundle's OpenVINO INT8 is beside for reference. Throughput is
lineside's own measurement against the FP32 ONNX model, in one run.

    python benchmarks/int8_gate.py elpv --shots 10 --repeats 1 --force --keep /tmp/k/elpv
    python benchmarks/ort_int8_error.py /tmp/k/elpv --shots 10
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_data import open_benchmark_data  # noqa: E402


def nncf_qdq(prepared, calib: np.ndarray, ignored: list[str]):
    """NNCF's ONNX backend on the prepared model: QDQ, per-tensor activations, full bias correction."""
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, QuantizationParameters

    name = prepared.graph.input[0].name
    return nncf.quantize(prepared, nncf.Dataset([{name: calib[i:i + 1]} for i in range(len(calib))]),
                         subset_size=len(calib), fast_bias_correction=False,
                         ignored_scope=nncf.IgnoredScope(names=ignored, validate=False),
                         advanced_parameters=AdvancedQuantizationParameters(
                             activations_quantization_params=QuantizationParameters(per_channel=False)))


def nncf_choices(quantized) -> tuple[dict, dict]:
    """(activation tensor -> (rmin, rmax), Conv node -> bias) from NNCF's QDQ model."""
    from onnx import numpy_helper as nh

    values = {i.name: nh.to_array(i) for i in quantized.graph.initializer}
    values.update({n.output[0]: nh.to_array(n.attribute[0].t) for n in quantized.graph.node
                   if n.op_type == "Constant"})
    ranges = {}
    for n in quantized.graph.node:
        if n.op_type == "QuantizeLinear":
            scale, zero = float(values[n.input[1]]), values[n.input[2]]
            lo, hi = (-128, 127) if zero.dtype == np.int8 else (0, 255)
            ranges[n.input[0]] = (np.float32((lo - int(zero)) * scale), np.float32((hi - int(zero)) * scale))
    biases = {n.name: values[n.input[2]] for n in quantized.graph.node
              if n.op_type == "Conv" and len(n.input) > 2 and n.input[2] in values}
    return ranges, biases


def qoperator(prepared_path: Path, out: Path, calib: np.ndarray, exclude: list[str], ranges=None,
              bias_correction: bool = True) -> Path:
    """ONNX Runtime's QOperator quantizer as the shipped recipe calls it, with optional ranges."""
    import onnx
    from onnxruntime import quantization as q

    from lineside.export.quantize import correct_conv_biases

    model = onnx.load(str(prepared_path))
    name = model.graph.input[0].name

    class Reader(q.CalibrationDataReader):
        def __init__(self):
            self.items = iter([{name: calib[i:i + 1]} for i in range(len(calib))])

        def get_next(self):
            return next(self.items, None)

    extra = {"ActivationSymmetric": False, "WeightSymmetric": True}
    if ranges:
        extra["TensorQuantOverrides"] = {t: [{"rmin": a, "rmax": b}] for t, (a, b) in ranges.items()}
    q.quantize_static(str(prepared_path), str(out), Reader(), quant_format=q.QuantFormat.QOperator,
                      activation_type=q.QuantType.QUInt8, weight_type=q.QuantType.QInt8, per_channel=True,
                      reduce_range=False, calibrate_method=q.CalibrationMethod.MinMax, nodes_to_exclude=exclude,
                      extra_options=extra)
    if bias_correction:
        quantized = onnx.load(str(out))
        correct_conv_biases(model, quantized, calib)
        onnx.save(quantized, str(out))
    return out


def with_biases(prepared_path: Path, biases: dict, out: Path) -> Path:
    import onnx
    from onnx import numpy_helper as nh

    model = onnx.load(str(prepared_path))
    init = {i.name: i for i in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Conv" and len(n.input) > 2 and n.name in biases and n.input[2] in init:
            init[n.input[2]].CopyFrom(nh.from_array(biases[n.name].astype(np.float32), n.input[2]))
    onnx.save(model, str(out))
    return out


def main(argv=None) -> int:
    import onnx
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from lineside.dataset import load_arrays
    from lineside.export.quantize import ORT_CALIB_IMAGES, ORT_RECIPES, first_block_convs, float_nodes
    from lineside.export.refit import FeatureGraph
    from lineside.runtime.bench import raw_fps
    from lineside.runtime.model import open_model

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("keep", type=Path, help="a folder written by benchmarks/int8_gate.py --keep")
    ap.add_argument("--shots", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seconds", type=float, default=3.0, help="throughput measurement per model")
    args = ap.parse_args(argv)

    tag = f"{args.shots}_{args.seed}"
    bundle = args.keep / f"bundle_{tag}"
    spec = open_model(bundle, backend="onnxruntime").spec
    x, _, _ = load_arrays(open_benchmark_data(str(args.keep / f"train_{tag}.csv")), spec, progress=False)
    calib = np.ascontiguousarray(np.concatenate([x, x[:, ::-1], x[:, :, ::-1], x[:, ::-1, ::-1]])[:ORT_CALIB_IMAGES])
    rest = open_benchmark_data(str(args.keep / f"rest_{tag}.csv"))
    rest = rest.subset(list(range(0, len(rest.targets), max(1, len(rest.targets) // 200))))
    xr, _, _ = load_arrays(rest, spec, progress=False)
    reference = FeatureGraph(bundle / "model_fp32.onnx", "onnxruntime").both(xr)[1]
    spread = reference.reshape(-1, reference.shape[-1]).std(0) + 1e-6

    def error(path: Path, runtime: str = "onnxruntime") -> float:
        features = FeatureGraph(path, runtime, "int8").both(xr)[1]
        return float((np.abs(features - reference).reshape(-1, reference.shape[-1]) / spread).mean())

    recipe = ORT_RECIPES[0][1]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        prepared_path = tmp / "prepared.onnx"
        quant_pre_process(str(bundle / "model_fp32.onnx"), str(prepared_path), skip_symbolic_shape=False)
        prepared = onnx.load(str(prepared_path))
        ignored = float_nodes(prepared, recipe.get("float_ends", False), recipe.get("float_linear", False),
                              recipe.get("float_tail", False))
        depthwise = [n.name for n in prepared.graph.node if n.op_type == "Conv"
                     and any(a.name == "group" and a.i > 1 for a in n.attribute)]
        qdq = nncf_qdq(prepared, calib, ignored)
        onnx.save(qdq, str(tmp / "nncf-qdq.onnx"))
        ranges, biases = nncf_choices(qdq)
        models = {
            "qoperator": qoperator(prepared_path, tmp / "qoperator.onnx", calib, ignored),
            "qoperator-nncf-ranges": qoperator(prepared_path, tmp / "ranges.onnx", calib, ignored, ranges),
            "qoperator-nncf-biases": qoperator(with_biases(prepared_path, biases, tmp / "biased.onnx"),
                                               tmp / "biases.onnx", calib, ignored, ranges, bias_correction=False),
            "qoperator-depthwise-float": qoperator(prepared_path, tmp / "dw.onnx", calib, ignored + depthwise),
            "qoperator-first-block-float": qoperator(prepared_path, tmp / "first.onnx", calib,
                                                     ignored + [n for n in first_block_convs(prepared)
                                                                if n not in ignored]),
            "nncf-qdq": tmp / "nncf-qdq.onnx",
        }
        fp32_fps = raw_fps(open_model(bundle / "model_fp32.onnx", backend="onnxruntime"), args.seconds)
        print(f"{'model':<28} {'feature error':>13} {'x FP32 ONNX':>11}")
        print(f"{'OpenVINO INT8 (bundle)':<28} {error(bundle / 'model_int8.xml', 'openvino'):>13.3f} {'-':>11}")
        for name, path in models.items():
            fps = raw_fps(open_model(path, backend="onnxruntime", precision="int8"), args.seconds)
            print(f"{name:<28} {error(path):>13.3f} {fps / fp32_fps:>11.2f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
