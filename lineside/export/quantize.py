"""INT8 post-training quantization (OpenVINO through NNCF, ONNX Runtime through its
static quantizer) and the accuracy gate.

An INT8 model is kept only if, on the same images, its balanced accuracy is no
more than `max_drop` percentage points below the FP32 model's and it gives FP32's
label on at least `min_agreement` percent of them. The recipes of each runtime are
tried in order (today one each); if none passes, no INT8 model is written.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np

from lineside.errors import require
from lineside.metrics import classification_report

from .openvino_export import set_metadata

log = logging.getLogger(__name__)

# (name, NNCF options): tried in order until one passes the gate. On NEU (Lite0, 10 images
# per class, 1740 held out) NNCF's default fast bias correction lost 0.40 points with 98.7%
# top-1 agreement; full bias correction lost none (+0.06) but changed 11 labels (99.37%
# agreement); keeping the first convolution and the classifier head in float as well
# ("float ends": the layers most sensitive to quantization in small CNNs, about 3% of the
# compute) changed 5 (99.71%, no loss) at 96-99% of the all-INT8 throughput. On today's
# default model (a head on pooled middle stages, four turns averaged in the graph) the
# linear convolutions (the projections that end each inverted-residual block, whose
# signed, wide outputs are what the head pools) are kept in float too, and so is
# everything before the first convolution (openvino_preprocessing). Calibrated as the
# gate calibrates without --eval (half of the training images), on NEU draw 2 the labels
# of the 1,740 images not drawn changed on 1.15% with float ends alone, 0.69% with the
# preprocessing in float as well, and on none with the linear convolutions in float too
# (draw 0: none either). Float ends alone were the first recipe until the gate kept one
# that way (estimated 100.00%, 99.31% in truth): it is gone.
RECIPES = (
    ("bias-correction-float-ends-float-linear-float-tail", {"fast_bias_correction": False, "subset_size": 300,
                                                            "float_ends": True, "float_linear": True,
                                                            "float_tail": True}),
)


# ONNX Runtime static quantization, tried in order. Measured on the NEU model (see README):
# QOperator (QLinearConv) with uint8 activations and int8 per-channel weights ran 2.3x
# faster than FP32, while the same recipe in QDQ format ran 1.46x and uint8 weights ran
# 4x slower than FP32 and lost 0.57 points. The in-graph preprocessing (transpose, cast,
# normalise) and the softmax stay in float: quantizing the raw 0..255 input or the
# probabilities only loses precision. ONNX Runtime has no bias correction of its own:
# `bias_correction` adds it (correct_conv_biases); on NEU it brought the labels that
# changed from 11 to 6 of 1740 (99.66% agreement) and the loss from 0.06 points to none.
# On today's default model (a head on pooled middle stages) the weak NEU draw lost 1.32
# points (98.16% agreement) all in INT8; keeping the linear convolutions (see RECIPES) in
# float lost none (-0.40, 99.14%) at the same throughput (1.98x FP32, against 1.97x all
# INT8), so that is the one recipe, while keeping the first convolution and the head, the
# residual additions or the pooling in float changed nothing or made it worse. ONNX
# Runtime's MinMax calibrator keeps every activation of every calibration image in memory
# (about 1 GB per 60 images of a 224x224 Lite0), so at most ORT_CALIB_IMAGES are used. Its
# chunked mode (CalibMaxIntermediateOutputs) bounds memory but averaged the ranges: on NEU
# it cost 0.23 points and 0.35% agreement, so it is not used (its Percentile calibrator
# needed more than 23 GB for 120 images of a 224x224 model). The stem and the first
# depthwise convolution stay in float too (first_block_convs): on elpv at 10 cells per
# class the cells not drawn lost 0.38 points (98.41% agreement) instead of 1.66 (96.41%),
# and the model ran faster (2.63x FP32 against 2.05x: ONNX Runtime's INT8 kernels are
# slow on a 3-channel convolution and on a depthwise one over the largest feature map).
ORT_RECIPES = (
    ("qoperator-u8s8-minmax-bias-correction-float-linear-float-tail-float-first-block", {
        "format": "QOperator", "calibrate": "MinMax", "bias_correction": True, "float_linear": True,
        "float_tail": True, "float_first_block": True}),
)
ORT_CALIB_IMAGES = 120


# Activations after which a convolution's output is bounded (ReLU6 and the like): a
# convolution not followed by one has a linear output ("projection", the bottleneck that
# ends an inverted-residual block), signed and wide.
ACTIVATIONS_ONNX = {"Clip", "Relu", "LeakyRelu", "HardSigmoid", "HardSwish", "Sigmoid", "PRelu", "Elu", "Gelu"}
ACTIVATIONS_OV = {"Clamp", "Relu", "HSwish", "Swish", "Sigmoid", "HSigmoid", "PRelu", "Elu", "Gelu", "Mish"}


def float_nodes(model, ends: bool = False, linear_convs: bool = False, tail: bool = False,
                first_block: bool = False) -> list[str]:
    """Names of the nodes that stay in float: everything before the first Conv
    (layout, cast, normalisation) and the final Softmax; with `ends`, also the first
    Conv and the classifier head (Gemm / MatMul); with `linear_convs`, every Conv whose
    output feeds no activation (the projections of inverted-residual blocks); with
    `tail`, every node after the first Conv from which no Conv follows (tail_nodes); with
    `first_block`, the first Conv and the first depthwise Conv (first_block_convs)."""
    names = []
    nodes = list(model.graph.node)
    if first_block:
        names += first_block_convs(model)
    for node in nodes:
        if node.op_type == "Conv":
            if ends:
                names.append(node.name)
            break
        names.append(node.name)
    names += [n.name for n in nodes if n.op_type == "Softmax"]
    if ends:
        names += [n.name for n in nodes if n.op_type in ("Gemm", "MatMul")]
    if linear_convs:
        consumers: dict[str, list[str]] = {}
        for n in nodes:
            for i in n.input:
                consumers.setdefault(i, []).append(n.op_type)
        names += [n.name for n in nodes if n.op_type == "Conv" and n.name not in names
                  and not ACTIVATIONS_ONNX & set(consumers.get(n.output[0], []))]
    if tail:
        names += [n for n in tail_nodes(model) if n not in names]
    return list(dict.fromkeys(names))


def first_block_convs(model) -> list[str]:
    """The first convolution (the stem) and the first depthwise convolution of an ONNX
    model: the layers whose INT8 rounding the rest of the network carries furthest. On the
    kept elpv model (10 images per class), keeping one convolution at a time in float
    lowered the error of the features the head reads from 0.53 to 0.29 (in units of each
    feature's spread) for the first depthwise convolution, 0.52 for the stem, and nothing
    measurable for any other; both together, 0.26 (NEU: 0.70 to 0.35)."""
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    depthwise = [n for n in convs if any(a.name == "group" and a.i > 1 for a in n.attribute)]
    return [n.name for n in convs[:1] + depthwise[:1]]


def tail_nodes(model) -> list[str]:
    """The nodes of an ONNX classifier that come after its last convolution on every path:
    the pooling of each tapped stage, the concatenation of the pooled features, the mean
    over the test-time views, the head and the softmax. In INT8 these put the features the
    head reads through 8 bits on one scale for all of them (stage averages near 0.1 beside
    stage maxima near 20); they cost almost no compute, so the recipes keep them in float."""
    nodes = list(model.graph.node)
    consumers: dict[str, list] = {}
    for n in nodes:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    feeds_conv: dict[str, bool] = {}
    for n in reversed(nodes):      # topological order: every consumer is decided first
        feeds_conv[n.name] = n.op_type == "Conv" or any(
            feeds_conv.get(c.name, False) for o in n.output for c in consumers.get(o, []))
    first = next((i for i, n in enumerate(nodes) if n.op_type == "Conv"), len(nodes))
    return [n.name for n in nodes[first:] if not feeds_conv[n.name]]


class _IntegerTensorNote(logging.Filter):
    """Drops ONNX Runtime's quantizer warning about a tensor it will not quantize because it
    holds integers or booleans (e.g. elem_type 7, int64: the indices that pick the test-time views), which
    is how it should be: printed on every export, it read as a failure. Its other warnings
    pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith("Inference failed or unsupported type to quantize")
                    and re.search(r"elem_type: (2|3|4|5|6|7|9|12|13)\n", message))


def quantize_onnxruntime(fp32_onnx: Path, out_onnx: Path, calib: np.ndarray, metadata, recipe: dict) -> Path:
    """Quantize an FP32 ONNX model with ONNX Runtime's static quantizer on calibration images."""
    onnx = require("onnx", "export")
    q = require("onnxruntime.quantization", None)
    from .onnx_export import write_metadata

    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(q.CalibrationDataReader):
        def __init__(self, x, name):
            self.items = iter([{name: x[i:i + 1]} for i in range(len(x))])

        def get_next(self):
            return next(self.items, None)

    if len(calib) > ORT_CALIB_IMAGES:
        calib = calib[np.sort(np.random.default_rng(0).choice(len(calib), ORT_CALIB_IMAGES, replace=False))]
    prepared = out_onnx.with_name(out_onnx.stem + ".prep.onnx")
    note = _IntegerTensorNote()
    logging.getLogger().addFilter(note)
    try:
        quant_pre_process(str(fp32_onnx), str(prepared), skip_symbolic_shape=False)
        model = onnx.load(str(prepared))
        input_name = model.graph.input[0].name
        q.quantize_static(
            str(prepared), str(out_onnx), Reader(calib, input_name),
            quant_format=getattr(q.QuantFormat, recipe["format"]),
            activation_type=q.QuantType.QUInt8, weight_type=q.QuantType.QInt8, per_channel=True,
            reduce_range=False, calibrate_method=getattr(q.CalibrationMethod, recipe["calibrate"]),
            nodes_to_exclude=float_nodes(model, recipe.get("float_ends", False), recipe.get("float_linear", False),
                                         recipe.get("float_tail", False), recipe.get("float_first_block", False))
            + (onnx_scorer(model) if recipe.get("float_scorer") else []),
            extra_options={"ActivationSymmetric": False, "WeightSymmetric": True})
        if recipe.get("bias_correction"):
            quantized = onnx.load(str(out_onnx))
            correct_conv_biases(model, quantized, calib)
            onnx.save(quantized, str(out_onnx))
    finally:
        logging.getLogger().removeFilter(note)
        prepared.unlink(missing_ok=True)
    return write_metadata(out_onnx, metadata)


QUANTIZED = "_quantized"   # ONNX Runtime's suffix for a quantized tensor or weight


def correct_conv_biases(fp32, quantized, calib: np.ndarray, batch: int = 8) -> int:
    """Bias correction for ONNX Runtime's QLinearConv layers (Nagel et al., 2019, "Data-free
    quantization through weight equalization and bias correction"): rounding the weights
    to int8 shifts each output channel's mean by (W_q - W) . E[x]. E[x], the mean of each
    convolution's input per channel, is measured on the FP32 model over the calibration
    images; the shift is subtracted from the layer's int32 bias. `fp32` is the model as
    the quantizer saw it (the same tensor names), `quantized` is changed in place.
    Returns the number of layers corrected."""
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper as nh

    def original(name):
        return name[:-len(QUANTIZED)] if name.endswith(QUANTIZED) else None

    qinit = {i.name: i for i in quantized.graph.initializer}
    weights = {i.name: i for i in fp32.graph.initializer}
    graph_inputs = {i.name for i in fp32.graph.input}
    tensors = {o for node in fp32.graph.node for o in node.output} | graph_inputs
    layers = []
    for node in quantized.graph.node:
        if node.op_type != "QLinearConv" or len(node.input) != 9:
            continue   # no bias to correct
        x, w = original(node.input[0]), original(node.input[3])
        if x in tensors and w in weights and all(n in qinit for n in (node.input[1], node.input[3],
                                                                      node.input[4], node.input[8])):
            layers.append((node, x, w))
    if not layers:
        return 0
    names = sorted({x for _, x, _ in layers} - graph_inputs)
    probe = onnx.ModelProto()
    probe.CopyFrom(fp32)
    probe.graph.output.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in names)
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    sums = dict.fromkeys(names + [input_name], 0.0)
    for i in range(0, len(calib), batch):
        outputs = session.run(names, {input_name: calib[i:i + batch]}) if names else []
        for name, a in zip(names + [input_name], [*outputs, calib[i:i + batch]]):
            if a.ndim == 4:   # NCHW -> per channel; the input of a model that starts with a Conv
                sums[name] = sums[name] + a.astype(np.float64).mean(axis=(2, 3)).sum(0)
    for node, x, w in layers:
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        w_scale = nh.to_array(qinit[node.input[4]]).astype(np.float64)
        w_q = nh.to_array(qinit[node.input[3]]).astype(np.float64)
        w_q *= w_scale.reshape(-1, 1, 1, 1) if w_scale.ndim else w_scale
        err = (w_q - nh.to_array(weights[w]).astype(np.float64)).sum(axis=(2, 3))   # (out, in / group)
        out_ch, in_per_group = err.shape
        mean_x = (sums[x] / len(calib)).reshape(group, in_per_group)
        shift = np.einsum("goi,gi->go", err.reshape(group, out_ch // group, in_per_group), mean_x).reshape(out_ch)
        bias_scale = float(nh.to_array(qinit[node.input[1]])) * w_scale
        bias = nh.to_array(qinit[node.input[8]]).astype(np.int64) - np.round(shift / bias_scale).astype(np.int64)
        qinit[node.input[8]].CopyFrom(nh.from_array(np.clip(bias, -2 ** 31, 2 ** 31 - 1).astype(np.int32),
                                                    node.input[8]))
    return len(layers)


def quantize_openvino(fp32_xml: Path, out_xml: Path, calib: np.ndarray, metadata, recipe: dict) -> Path:
    """Quantize an FP32 IR with NNCF on calibration images (N, H, W, 3) uint8."""
    ov = require("openvino", "export")
    nncf = require("nncf", "export")
    model = ov.Core().read_model(str(fp32_xml))
    dataset = nncf.Dataset([calib[i:i + 1] for i in range(len(calib))])
    options = dict(recipe)
    options["subset_size"] = min(options.get("subset_size", 300), len(calib))
    if "preset" in options:
        options["preset"] = getattr(nncf.QuantizationPreset, options["preset"])
    ignored = openvino_preprocessing(model)
    if options.pop("float_ends", False):
        ignored += openvino_float_ends(model)
    if options.pop("float_linear", False):
        ignored += [name for name in openvino_linear_convs(model) if name not in ignored]
    if options.pop("float_tail", False):
        ignored += [name for name in openvino_tail(model) if name not in ignored]
    if getattr(metadata, "anomaly", None):
        ignored += [name for name in openvino_beyond_convolutions(model) if name not in ignored]
    if options.pop("float_scorer", False):
        ignored += [name for name in openvino_scorer(model) if name not in ignored]
    if ignored:
        options["ignored_scope"] = nncf.IgnoredScope(names=ignored)
    quantized = nncf.quantize(model, dataset, **options)
    set_metadata(quantized, metadata)
    ov.save_model(quantized, str(out_xml))
    return out_xml


def openvino_beyond_convolutions(model) -> list[str]:
    """Every operation of an anomaly model that is not a convolution: only the backbone's
    convolutions go to INT8. The scorer (the features' interpolation and pooling, their
    projection, the distances to the bank, the maximum) stays in float: a distance between
    two nearly equal feature vectors, each rounded to 8 bits, is mostly rounding (bottle,
    everything NNCF would quantize: INT8 gave FP32's verdict on 77% of the test images)."""
    keep = ("Convolution", "GroupConvolution", "Constant", "Parameter", "Result")
    return [op.get_friendly_name() for op in model.get_ordered_ops() if op.get_type_name() not in keep]


def openvino_scorer(model) -> list[str]:
    """The operations a classifier with good parts (train/good_parts.py) computes its
    distance to them with: every one the logarithm of that distance depends on, the
    convolutions included. Quantised, they move every distance: on MVTec's bottle as four
    classes INT8 called no good bottle good (docs/unlabelled.md)."""
    logs = [op for op in model.get_ordered_ops() if op.get_type_name() == "Log"]
    return _ancestors(logs, lambda op: [v.get_node() for v in op.input_values()],
                      lambda op: op.get_friendly_name(),
                      lambda op: op.get_type_name() not in ("Constant", "Parameter"))


def onnx_scorer(model) -> list[str]:
    """The nodes of an ONNX classifier with good parts that its distance to them depends
    on (openvino_scorer, for ONNX Runtime)."""
    producer = {out: n for n in model.graph.node for out in n.output}
    logs = [n for n in model.graph.node if n.op_type == "Log"]
    return _ancestors(logs, lambda n: [producer[i] for i in n.input if i in producer], lambda n: n.name,
                      lambda n: True)


def _ancestors(starts, parents, name, keep) -> list[str]:
    seen, stack, out = set(), list(starts), []
    while stack:
        node = stack.pop()
        key = name(node)
        if key in seen:
            continue
        seen.add(key)
        if keep(node):
            out.append(key)
        stack += parents(node)
    return out


def openvino_tail(model) -> list[str]:
    """The operations of an OpenVINO classifier after its last convolution on every path
    (the pooling, concatenation, view mean, head and softmax: see tail_nodes)."""
    convs = ("Convolution", "GroupConvolution")
    ops = model.get_ordered_ops()
    feeds_conv: dict[str, bool] = {}
    for op in reversed(ops):
        feeds_conv[op.get_friendly_name()] = op.get_type_name() in convs or any(
            feeds_conv.get(t.get_node().get_friendly_name(), False)
            for out in op.outputs() for t in out.get_target_inputs())
    kinds = [op.get_type_name() for op in ops]
    first = next((i for i, k in enumerate(kinds) if k in convs), len(ops))
    return [op.get_friendly_name() for op in ops[first:]
            if not feeds_conv[op.get_friendly_name()] and op.get_type_name() not in ("Constant", "Result")]


def openvino_preprocessing(model) -> list[str]:
    """Every operation before the first convolution: the in-graph conversion, layout,
    normalisation and the test-time views (slices, turns, concatenation). Data movement and
    scaling, in float in every recipe, as ONNX Runtime's (float_nodes): NNCF would otherwise
    put quantizers on the normalised image and on each view, and on NEU (draw 2 of 10
    images per class, 1,740 images not drawn) those alone changed 1.2% of the labels."""
    ops = model.get_ordered_ops()
    kinds = [op.get_type_name() for op in ops]
    first = kinds.index("Convolution") if "Convolution" in kinds else 0
    return [op.get_friendly_name() for op in ops[:first]]


def openvino_float_ends(model) -> list[str]:
    """The first convolution and the fully connected layers (the classifier head) of an
    OpenVINO model: kept in float by the float-ends recipes."""
    ops = model.get_ordered_ops()
    convs = [op.get_friendly_name() for op in ops if op.get_type_name() == "Convolution"]
    return convs[:1] + [op.get_friendly_name() for op in ops if op.get_type_name() == "MatMul"]


def openvino_linear_convs(model) -> list[str]:
    """Convolutions of an OpenVINO model whose output (after its bias) feeds no activation:
    the projections of inverted-residual blocks (see float_nodes)."""
    def consumers(op):
        return [t.get_node() for out in op.outputs() for t in out.get_target_inputs()]

    names = []
    for op in model.get_ordered_ops():
        if op.get_type_name() != "Convolution":
            continue
        after = consumers(op)
        if len(after) == 1 and after[0].get_type_name() == "Add" and any(
                i.get_source_output().get_node().get_type_name() == "Constant" for i in after[0].inputs()):
            after = consumers(after[0])   # the bias
        if not any(n.get_type_name() in ACTIVATIONS_OV for n in after):
            names.append(op.get_friendly_name())
    return names


def int8_gate(y_true, p_fp32: np.ndarray, p_int8: np.ndarray, labels, max_drop: float, paths=None,
              min_agreement: float = 0.0, ranking: bool = False) -> dict:
    """Compare INT8 with FP32 on the same labelled images. max_drop is in percentage points
    of balanced accuracy, min_agreement in percent of images with the same top-1 label.
    With `ranking` (an anomaly model: labels good, anomalous), the AUROC of the anomalous
    class's probability may not drop by more than max_drop points either: INT8 could keep
    every verdict and still rank a missed defect below the good parts."""
    fp32 = classification_report(y_true, p_fp32.argmax(1), labels)
    int8 = classification_report(y_true, p_int8.argmax(1), labels)
    drop = 100.0 * (fp32["balanced_accuracy"] - int8["balanced_accuracy"])
    flipped = np.flatnonzero(p_fp32.argmax(1) != p_int8.argmax(1))
    agreement = float(np.mean(p_fp32.argmax(1) == p_int8.argmax(1)))
    gate = {
        "n": int(len(y_true)),
        "fp32_balanced_accuracy": fp32["balanced_accuracy"],
        "int8_balanced_accuracy": int8["balanced_accuracy"],
        "drop_points": drop,
        "max_drop_points": max_drop,
        "top1_agreement": agreement,
        "min_agreement": min_agreement,
        "recall_change": {name: int8["per_class"][name]["recall"] - fp32["per_class"][name]["recall"]
                          for name in labels},
        "flipped": [{"image": str(paths[i]) if paths is not None else int(i),
                     "fp32": labels[int(p_fp32[i].argmax())], "int8": labels[int(p_int8[i].argmax())]}
                    for i in flipped],
        "passed": bool(drop <= max_drop and 100.0 * agreement >= min_agreement),
    }
    if ranking:
        gate.update(_auroc_gate(y_true, p_fp32, p_int8, max_drop))
        gate["passed"] = gate["passed"] and gate.get("auroc_passed", True)
    return gate


def _auroc_gate(y_true, p_fp32: np.ndarray, p_int8: np.ndarray, max_drop: float) -> dict:
    """The anomaly model's AUROC under FP32 and INT8 (None without both classes judged)."""
    from lineside.metrics import auroc

    y = np.asarray(y_true) == 1
    a32, a8 = auroc(y, p_fp32[:, 1]), auroc(y, p_int8[:, 1])
    if a32 is None or a8 is None:
        return {"fp32_auroc": None, "int8_auroc": None}
    drop = 100.0 * (a32 - a8)
    return {"fp32_auroc": 100.0 * a32, "int8_auroc": 100.0 * a8, "auroc_drop_points": drop,
            "auroc_passed": bool(drop <= max_drop)}


def _top_two(log_p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(-log_p, axis=1)
    return order[:, 0], order[:, 1]


def margin_shifts(p_fp32: np.ndarray, p_int8: np.ndarray) -> np.ndarray:
    """How far INT8 moves each image towards a different label: FP32's log-odds of its top
    class against its runner-up, minus INT8's log-odds of the same two (positive: closer to
    a flip; larger than the FP32 margin: a flip)."""
    l32 = np.log(np.clip(p_fp32.astype(np.float64), 1e-30, None))
    l8 = np.log(np.clip(p_int8.astype(np.float64), 1e-30, None))
    a, b = _top_two(l32)
    rows = np.arange(len(l32))
    return (l32[rows, a] - l32[rows, b]) - (l8[rows, a] - l8[rows, b])


def predicted_unseen(shifts: np.ndarray, oof_logits: np.ndarray, oof_labels: np.ndarray, labels) -> dict:
    """What INT8 would do to images the model never saw, from two measurements: the margin
    shifts INT8 causes (measured on judged images), and the margins the model has on images
    it did not train on (its out-of-fold logits, train/calibrate.py). An unseen image with
    margin m changes label when the shift exceeds m; with the shift independent of the image
    (measured on NEU: correlation 0.03 between shift and margin), the expected share that
    changes is the mean over out-of-fold images of P(shift > m). The drop counts, per class
    (balanced), the right answers expected to change, less the wrong ones expected to change
    to the true label (their runner-up). Out-of-fold models trained on fewer images are less
    sure than the final one, so the estimate errs on the side of refusing."""
    shifts = np.sort(np.asarray(shifts, np.float64))
    z = np.asarray(oof_logits, np.float64)
    a, b = _top_two(z)
    rows = np.arange(len(z))
    m = z[rows, a] - z[rows, b]
    flip = 1.0 - np.searchsorted(shifts, m, side="right") / len(shifts)     # P(shift > m)
    y = np.asarray(oof_labels)
    change = np.where(a == y, flip, np.where(b == y, -flip, 0.0))         # + a right answer lost, - one won
    per_class = [float(np.sum(change[y == c]) / np.sum(y == c)) for c in range(len(labels)) if np.any(y == c)]
    return {"agreement": float(1.0 - flip.mean()), "drop_points": 100.0 * float(np.mean(per_class)),
            "shifts": int(len(shifts)), "oof_images": int(len(z))}
