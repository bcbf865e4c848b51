"""A linear head fitted again on the features of the INT8 network.

A head on frozen features is a logistic regression on the pooled features of the
backbone. Quantizing the backbone moves those features a little, and a head that never
saw the moved features is then judged against FP32 on labels it was not fitted for. The
features of the quantized graph are read here (the tensor the head reads, before the
mean over the test-time views), the head is fitted on them exactly as training fitted it
(same rows: every training image in the run's flips and turns; same regularisation and
class weights), and its weights are written into the INT8 graph.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lineside.errors import LinesideError, require
from lineside.train.calibrate import softmax

BATCH = 16


def features_tensor(onnx_model) -> tuple[str, str]:
    """(features, head, views): the name of the tensor of pooled features in an FP32 ONNX
    classifier (one row per image and test-time view, view-major), the name of its head
    node (the Gemm before the softmax), and whether the graph averages views before it."""
    nodes = list(onnx_model.graph.node)
    producer = {o: n for n in nodes for o in n.output}
    softmax = [n for n in nodes if n.op_type == "Softmax"]
    head = producer.get(softmax[-1].input[0]) if softmax else None
    if head is None or head.op_type != "Gemm":
        raise LinesideError("the model has no linear head before its softmax")
    feats = head.input[0]
    mean = producer.get(feats)
    if mean is not None and mean.op_type == "ReduceMean":
        reshape = producer.get(mean.input[0])
        if reshape is not None and reshape.op_type == "Reshape":
            return reshape.input[0], head.name
    return feats, head.name


@dataclass
class FeatureGraph:
    """A classifier graph (ONNX or OpenVINO IR) run for its probabilities and the features
    its head reads. `precision` "fp32" pins OpenVINO's float operations to f32 (as the
    runtime does for FP32 models); "int8" compiles it as the runtime compiles INT8."""
    path: Path
    runtime: str
    precision: str = "fp32"
    features: str | None = None

    def __post_init__(self):
        self.path = Path(self.path)
        if self.features is None:
            self.features = features_tensor_of(self.path)
        self._run = self._openvino() if self.runtime == "openvino" else self._onnxruntime()

    def _onnxruntime(self):
        onnx = require("onnx", "export")
        ort = require("onnxruntime", "export")
        model = onnx.load(str(self.path))
        model.graph.output.append(onnx.helper.make_tensor_value_info(self.features, onnx.TensorProto.FLOAT, None))
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        name, outputs = session.get_inputs()[0].name, [model.graph.output[0].name, self.features]
        return lambda x: session.run(outputs, {name: x})

    def _openvino(self):
        ov = require("openvino", "export")
        from lineside.runtime.model import OPENVINO_FP32

        core = ov.Core()
        model = core.read_model(str(self.path))
        found = [o for op in model.get_ordered_ops() for o in op.outputs() if self.features in o.get_names()]
        if not found:
            raise LinesideError(f"{self.path}: no tensor {self.features} to read the features from")
        model.add_outputs([found[0]])
        compiled = core.compile_model(model, "CPU", dict(OPENVINO_FP32) if self.precision == "fp32" else {})
        request = compiled.create_infer_request()

        def run(x):
            result = request.infer({0: x})
            return [np.array(result[compiled.output(0)]), np.array(result[compiled.outputs[-1]])]
        return run

    def both(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(probabilities (N, classes), features (N, views, D))."""
        probs, feats = [], []
        for s in range(0, len(x), BATCH):
            batch = x[s:s + BATCH]
            p, f = self._run(np.ascontiguousarray(batch))
            probs.append(p)
            feats.append(f.reshape(-1, len(batch), f.shape[-1]).transpose(1, 0, 2))
        return np.concatenate(probs), np.concatenate(feats)

    def proba(self, x: np.ndarray) -> np.ndarray:
        return self.both(x)[0]

    def averaged(self, x: np.ndarray) -> np.ndarray:
        """The features the head reads: the mean over the test-time views."""
        return self.both(x)[1].mean(1)


@dataclass(frozen=True)
class HeadRecipe:
    """How the run fitted its head (trainer.fit_head_on), to fit it again the same way."""
    standardise: bool
    balance: bool
    mirrored: bool                  # the graph's views lack the mirror images the run's bank holds
    orientations: tuple[int, ...]   # a graph without views: each orientation is fed on its own
    seed: int
    temperature: float = 1.0        # the run's calibration, divided into FP32's head and into INT8's


def head_recipe(loaded, config, metrics: dict) -> tuple[HeadRecipe | None, str]:
    """(recipe, why): how to fit the INT8 head again, or None and why it is not. Only a plain
    linear head on frozen features is fitted again: a fine-tuned network, an anomaly model,
    a model with the good parts or the guard, and a head that --unlabelled's self-training
    fitted on more rows keep the INT8 model with the run's own head."""
    from lineside.train.augment import orientations
    from lineside.train.model import Classifier

    if type(loaded.model) is not Classifier or loaded.trained.strategy != "linear":
        return None, "only a linear head on frozen features is fitted again on INT8 features"
    if metrics.get("unlabelled"):
        return None, "a head trained with --unlabelled is not fitted again"
    a = config.augment
    group = orientations(a.flip, a.rot90, loaded.spec.height == loaded.spec.width)
    views = loaded.model.views or ()
    mirrored = any(k >= 4 for k in group) and not any(k >= 4 for k in views)
    calibration = metrics.get("calibration") if isinstance(metrics.get("calibration"), dict) else {}
    temperature = calibration.get("temperature", 1.0)
    temperature = float(temperature) if isinstance(temperature, (int, float)) and temperature > 0 else 1.0
    return HeadRecipe(bool(loaded.model.taps), config.balance == "loss", mirrored,
                      () if views else tuple(group), int(config.seed), temperature), ""


def training_rows(graph: FeatureGraph, x: np.ndarray, recipe: HeadRecipe) -> tuple[np.ndarray, np.ndarray]:
    """Rows to fit a head on, (N, R, D): each image's features in each of the graph's views,
    and with `mirrored` in each view of its mirror image as well (a rotation group of four
    views and its mirror: the eight flips and turns the linear recipe's bank holds); a
    graph without views is fed each orientation of the run's group. Returns the rows and
    the features the head reads for each image as it is, (N, D)."""
    from lineside.train.augment import orient

    if recipe.orientations:
        images = [np.stack([orient(im, k) for im in x]) for k in recipe.orientations]
    else:
        images = [x, np.ascontiguousarray(x[:, :, ::-1])] if recipe.mirrored else [x]
    feeds = [graph.both(np.ascontiguousarray(im))[1] for im in images]
    return np.concatenate(feeds, axis=1), feeds[0].mean(1)


class Head:
    """A linear head fitted as the run fitted its own (fit_linear_head): logits of averaged features."""

    def __init__(self, rows: np.ndarray, y: np.ndarray, classes: int, recipe: HeadRecipe, max_iter: int | None = None):
        import torch

        from lineside.train.heads import fit_linear_head
        from lineside.train.loop import class_weights
        from lineside.train.trainer import HEAD_L2

        feats = np.asarray(rows, np.float32).reshape(-1, rows.shape[-1])       # image-major
        target = np.repeat(np.asarray(y, np.int64), rows.shape[1])
        head = torch.nn.Linear(feats.shape[1], classes)
        weight = class_weights(np.bincount(target, minlength=classes)) if recipe.balance else None
        fit_linear_head(head, torch.from_numpy(feats), torch.from_numpy(target),
                        HEAD_L2 if recipe.standardise else 0.5 / len(target), recipe.standardise, weight,
                        max_iter=max_iter or (500 if recipe.standardise else 300))
        self.weight = head.weight.detach().numpy().astype(np.float64)
        self.bias = head.bias.detach().numpy().astype(np.float64)

    def logits(self, feats: np.ndarray) -> np.ndarray:
        return np.asarray(feats, np.float64) @ self.weight.T + self.bias


def line_head(rows: np.ndarray, y: np.ndarray, classes: int, recipe: HeadRecipe) -> Head:
    """The INT8 head for the line: fitted on every training image's INT8 rows as the run
    fitted FP32's, and divided by the run's temperature as FP32's was (the two heads read
    nearly the same features, so one calibration serves both)."""
    head = Head(rows, y, classes, recipe)
    head.weight, head.bias = head.weight / recipe.temperature, head.bias / recipe.temperature
    return head


def write_head(path: Path, runtime: str, head: Head) -> None:
    """Put `head`'s weights into the linear head of an INT8 graph whose head is in float."""
    if runtime == "onnxruntime":
        onnx = require("onnx", "export")
        from onnx import numpy_helper as nh

        model = onnx.load(str(path))
        gemm = model.graph.node[[n.name for n in model.graph.node].index(_onnx_head(model))]
        trans_b = next((a.i for a in gemm.attribute if a.name == "transB"), 0)
        weight = head.weight if trans_b else head.weight.T
        values = {gemm.input[1]: weight.astype(np.float32), gemm.input[2]: head.bias.astype(np.float32)}
        for init in model.graph.initializer:
            if init.name in values:
                init.CopyFrom(nh.from_array(values.pop(init.name), init.name))
        if values:
            raise LinesideError(f"{path}: the head's weights are not constants of the graph")
        onnx.save(model, str(path))
        return
    ov = require("openvino", "export")
    model = ov.Core().read_model(str(path))
    matmul, add = _openvino_head(model)
    trans_b = bool(matmul.get_attributes().get("transpose_b"))
    weight = head.weight if trans_b else head.weight.T
    bias_in = add.input(1)
    shape = list(bias_in.get_source_output().get_partial_shape().to_shape())
    matmul.input(1).replace_source_output(ov.opset13.constant(weight.astype(np.float32)).output(0))
    bias_in.replace_source_output(ov.opset13.constant(head.bias.astype(np.float32).reshape(shape)).output(0))
    tmp = path.with_name(path.stem + ".head.xml")
    ov.save_model(model, str(tmp), compress_to_fp16=False)   # the head as fitted; the rest is stored as it was
    del model
    tmp.replace(path)
    tmp.with_suffix(".bin").replace(path.with_suffix(".bin"))


def _onnx_head(model) -> str:
    return features_tensor(model)[1]


def _openvino_head(model):
    """The MatMul and bias Add of an OpenVINO classifier's head (before its Softmax)."""
    softmax_ops = [op for op in model.get_ordered_ops() if op.get_type_name() == "Softmax"]
    if not softmax_ops:
        raise LinesideError("the model has no softmax")
    add = softmax_ops[-1].input(0).get_source_output().get_node()
    matmul = add.input(0).get_source_output().get_node() if add.get_type_name() == "Add" else None
    if matmul is None or matmul.get_type_name() != "MatMul":
        raise LinesideError("the model has no linear head before its softmax")
    return matmul, add


@dataclass
class Refit:
    """An INT8 model's head, to be fitted again on its own features of the training images.
    `image`: the training image of each judged view when INT8 is judged out of fold (the
    originals first, then their augmented copies); None when it is judged directly on
    labelled images the run never trained on."""
    recipe: HeadRecipe
    x: np.ndarray
    y: np.ndarray
    classes: int
    image: np.ndarray | None = None
    cache: dict = field(default_factory=dict)     # the FP32 features, per runtime

    def fit_into(self, runtime: str, fp32_path: Path, int8_path: Path) -> dict:
        """Fit the head on the INT8 graph's features and write it into the graph. Returns
        what to report."""
        g8 = FeatureGraph(int8_path, runtime, "int8", features_tensor_of(fp32_path))
        rows, _ = training_rows(g8, self.x, self.recipe)
        write_head(int8_path, runtime, line_head(rows, self.y, self.classes, self.recipe))
        return {"head": self.described(rows), "temperature": self.recipe.temperature}

    def described(self, rows) -> str:
        return f"fitted on the INT8 network's features of the {len(self.y)} training images ({rows.shape[1]} views each)"

    def judge_out_of_fold(self, runtime: str, fp32_path: Path, int8_path: Path, x_judged: np.ndarray) -> dict:
        """Out-of-fold logits of the judged views from heads fitted, fold by fold, on FP32 and
        on INT8 features of the other training images (the same folds, the same fit): the
        two differ only by what INT8 did to the features. FP32's side is computed once (its
        ONNX and OpenVINO models give the same features: parity). The INT8 head for the line
        is written into the graph. Returns the probabilities, the report and what the
        written graph must give on the first judged views."""
        n = len(self.y)
        if self.image is None or not np.array_equal(self.image[:n], np.arange(n)):
            raise ValueError("the judged views must start with the training images themselves")
        name = features_tensor_of(fp32_path)
        fold, k = folds(self.y, self.recipe)
        if "fp32" not in self.cache:
            g32 = FeatureGraph(fp32_path, runtime, "fp32", name)
            self.cache["fp32"] = self.fold_logits(training_rows(g32, self.x, self.recipe)[0],
                                                  g32.averaged(x_judged), fold, k)
        g8 = FeatureGraph(int8_path, runtime, "int8", name)
        rows8, _ = training_rows(g8, self.x, self.recipe)
        j8 = g8.averaged(x_judged)
        head = line_head(rows8, self.y, self.classes, self.recipe)
        write_head(int8_path, runtime, head)
        return {"p_fp32": softmax(self.cache["fp32"]), "p_int8": softmax(self.fold_logits(rows8, j8, fold, k)),
                "expected": softmax(head.logits(j8[:PARITY_VIEWS])),
                "report": {"head": self.described(rows8), "temperature": self.recipe.temperature}}

    def fold_logits(self, rows: np.ndarray, judged: np.ndarray, fold: np.ndarray, k: int) -> np.ndarray:
        """Logits of each judged view from the head fitted on the other folds' rows (fewer
        iterations than the line's head: both sides alike, and 5x faster)."""
        logits = np.zeros((len(judged), self.classes))
        for f in range(k):
            held = fold[self.image] == f
            logits[held] = Head(rows[fold != f], self.y[fold != f], self.classes, self.recipe,
                                FOLD_ITERATIONS).logits(judged[held]) / self.recipe.temperature
        return logits


FOLD_ITERATIONS = 100
PARITY_VIEWS = 64    # judged views the written INT8 graph is run on, to check it gives the fitted head's labels


def folds(y: np.ndarray, recipe: HeadRecipe) -> tuple[np.ndarray, int]:
    from lineside.train.calibrate import stratified_folds

    return stratified_folds(y, recipe.seed, 5)


def features_tensor_of(fp32_path: Path) -> str:
    """The name of the features tensor of an FP32 graph, ONNX (features_tensor) or OpenVINO IR
    (the same walk back from the softmax: Add, MatMul, ReduceMean, Reshape)."""
    fp32_path = Path(fp32_path)
    if fp32_path.suffix == ".onnx":
        onnx = require("onnx", "export")
        return features_tensor(onnx.load(str(fp32_path)))[0]
    ov = require("openvino", "export")
    matmul, _ = _openvino_head(ov.Core().read_model(str(fp32_path)))
    out = matmul.input(0).get_source_output()
    mean = out.get_node()
    if mean.get_type_name() == "ReduceMean" and mean.input(0).get_source_output().get_node().get_type_name() == "Reshape":
        out = mean.input(0).get_source_output().get_node().input(0).get_source_output()
    names = sorted(out.get_names())
    if not names:
        raise LinesideError(f"{fp32_path}: the features its head reads have no name")
    return names[0]
