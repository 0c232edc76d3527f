"""ONNX export with one interface for every model, onnxruntime scoring and the parity check.

Every exported model has exactly one input, `input` (float32 [N, n_features], features in the
version's schema order), and exactly one output, `probabilities` (float32 [N, 2]; column 1 is
P(label=1)). No ZipMap and no `label` output: replicas and Go clients read one plain tensor by name
(or at index 0) whatever the algorithm. Converters target opset 15 (ai.onnx.ml 1), IR version 8, so
older onnxruntime builds (such as the ones Go bindings link) can load the models too. The feature
names are also written to the model's metadata (`feature_names`, JSON) so the bytes describe
themselves.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
import xgboost as xgb
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline

from training.models import PlattXGBoost, ProbabilityModel, positive_scores

INPUT_NAME = "input"
OUTPUT_NAME = "probabilities"
TARGET_OPSET = 15


class ExportError(Exception):
    """The model cannot be exported with the normalised interface."""


class ParityError(Exception):
    """The ONNX bytes do not reproduce the native model's scores; never publish such bytes."""


@dataclass(frozen=True)
class OnnxInterface:
    """What a session sees: input name/type/shape and each output's name/type/shape."""

    input_name: str
    input_type: str
    input_shape: tuple[int | str | None, ...]
    outputs: tuple[tuple[str, str, tuple[int | str | None, ...]], ...]

    @property
    def n_features(self) -> int | None:
        last = self.input_shape[-1] if self.input_shape else None
        return last if isinstance(last, int) else None


def to_onnx(model: ProbabilityModel, n_features: int, feature_names: list[str] | None = None) -> bytes:
    """Convert a fitted model from `training.models` and normalise its graph (see module docstring)."""
    if n_features < 1:
        raise ExportError(f"n_features: must be >= 1, got {n_features}")
    if feature_names is not None and len(feature_names) != n_features:
        raise ExportError(f"feature_names: {len(feature_names)} names for {n_features} features")
    if isinstance(model, xgb.XGBClassifier):
        proto = _convert_xgboost(model, n_features)
    elif isinstance(model, PlattXGBoost):
        proto = _convert_xgboost(model.model, n_features)
        _fold_platt_into_trees(proto, model.slope, model.intercept)
    elif isinstance(model, Pipeline | LogisticRegression):
        proto = _convert_sklearn(model, n_features)
    else:
        raise ExportError(f"cannot export a {type(model).__name__}")
    _normalise(proto, n_features)
    if feature_names is not None:
        onnx.helper.set_model_props(proto, {"feature_names": json.dumps(list(feature_names))})
    onnx.checker.check_model(proto, full_check=True)
    return proto.SerializeToString()


def _convert_xgboost(model: xgb.XGBClassifier, n_features: int) -> onnx.ModelProto:
    import onnxmltools
    from onnxmltools.convert.common.data_types import FloatTensorType

    return onnxmltools.convert_xgboost(
        model, initial_types=[(INPUT_NAME, FloatTensorType([None, n_features]))], target_opset=TARGET_OPSET)


def _convert_sklearn(model: Pipeline | LogisticRegression, n_features: int) -> onnx.ModelProto:
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType

    clf = model[-1] if isinstance(model, Pipeline) else model
    return convert_sklearn(
        model,
        initial_types=[(INPUT_NAME, FloatTensorType([None, n_features]))],
        options={id(clf): {"zipmap": False}},
        target_opset=TARGET_OPSET,
    )


def _fold_platt_into_trees(proto: onnx.ModelProto, slope: float, intercept: float) -> None:
    """sigmoid(slope * (sum(leaves) + base) + intercept): scale every leaf weight by slope and set
    the base value to slope * base + intercept. Only valid for the binary, logistic ensemble that
    onnxmltools emits for binary:logistic; anything else is refused rather than guessed."""
    trees = [n for n in proto.graph.node if n.op_type == "TreeEnsembleClassifier"]
    if len(trees) != 1:
        raise ExportError(f"calibration: expected one TreeEnsembleClassifier, found {len(trees)}")
    attrs = {a.name: a for a in trees[0].attribute}
    post = onnx.helper.get_attribute_value(attrs["post_transform"]) if "post_transform" in attrs else b""
    if post != b"LOGISTIC" or "class_weights" not in attrs:
        raise ExportError("calibration: tree ensemble is not a binary logistic ensemble with float weights")
    weights = attrs["class_weights"]
    scaled = [w * slope for w in weights.floats]
    del weights.floats[:]
    weights.floats.extend(scaled)
    base = list(attrs["base_values"].floats) if "base_values" in attrs else [0.0]
    if len(base) != 1:
        raise ExportError(f"calibration: expected one base value, found {len(base)}")
    new_base = onnx.helper.make_attribute("base_values", [base[0] * slope + intercept])
    if "base_values" in attrs:
        attrs["base_values"].CopyFrom(new_base)
    else:
        trees[0].attribute.append(new_base)


def _normalise(proto: onnx.ModelProto, n_features: int) -> None:
    """One input `input` float [N, n]; one output `probabilities` float [N, 2]; clean opset list."""
    graph = proto.graph
    initializers = {i.name for i in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]
    if len(inputs) != 1 or inputs[0].name != INPUT_NAME:
        raise ExportError(f"export: expected one input {INPUT_NAME!r}, got {[i.name for i in inputs]}")
    tensor = inputs[0].type.tensor_type
    dims = tensor.shape.dim
    if tensor.elem_type != onnx.TensorProto.FLOAT or len(dims) != 2 or dims[1].dim_value != n_features:
        raise ExportError(f"export: input must be float [N, {n_features}]")

    # Both converters name their probability tensor `probabilities`; if a future converter does not,
    # fail loudly here rather than publish a model the replicas cannot read.
    named = [o for o in graph.output if o.name == OUTPUT_NAME]
    if len(named) != 1:
        raise ExportError(f"export: no output {OUTPUT_NAME!r} among {[o.name for o in graph.output]}")
    keep = named[0]
    t = keep.type.tensor_type
    if t.elem_type != onnx.TensorProto.FLOAT or len(t.shape.dim) != 2 or t.shape.dim[1].dim_value != 2:
        raise ExportError(f"export: output {OUTPUT_NAME!r} must be float [N, 2]")
    keep_copy = onnx.ValueInfoProto()
    keep_copy.CopyFrom(keep)
    del graph.output[:]
    graph.output.append(keep_copy)

    # Converters may list a domain twice (skl2onnx does) or omit the default domain entirely
    # (onnxmltools for a pure tree ensemble); keep one entry per domain, the highest version.
    versions: dict[str, int] = {"": TARGET_OPSET}
    for imp in proto.opset_import:
        versions[imp.domain] = max(versions.get(imp.domain, 0), imp.version)
    del proto.opset_import[:]
    for domain, version in sorted(versions.items()):
        proto.opset_import.append(onnx.helper.make_opsetid(domain, version))


def interface(onnx_bytes: bytes) -> OnnxInterface:
    """The model's interface as onnxruntime reports it (what a replica or Go client will see)."""
    sess = session(onnx_bytes)
    (inp,) = sess.get_inputs()
    return OnnxInterface(
        input_name=inp.name,
        input_type=inp.type,
        input_shape=tuple(inp.shape),
        outputs=tuple((o.name, o.type, tuple(o.shape)) for o in sess.get_outputs()),
    )


def session(onnx_bytes: bytes) -> ort.InferenceSession:
    """A CPU session with one intra-op and one inter-op thread: deterministic, and the way replicas
    run (parallelism comes from replicas and batching, not from threads inside one call)."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(onnx_bytes, sess_options=opts, providers=["CPUExecutionProvider"])


def onnx_scores(onnx_bytes: bytes, X: np.ndarray) -> np.ndarray:
    """P(label=1) for each row of X (cast to float32), as float64, from one onnxruntime session."""
    rows = np.ascontiguousarray(np.asarray(X, dtype=np.float32))
    if rows.ndim != 2:
        raise ValueError(f"X: expected a 2-D array, got shape {rows.shape}")
    (probs,) = session(onnx_bytes).run([OUTPUT_NAME], {INPUT_NAME: rows})
    return np.asarray(probs[:, 1], dtype=np.float64)


def parity_check(
    native_model: ProbabilityModel, onnx_bytes: bytes, X: np.ndarray, tol: float = 1e-5
) -> float:
    """Max |ONNX - native| of P(label=1) over the rows of X; ParityError when it exceeds `tol`, when
    the bytes have a different interface (input name, feature count) or cannot be loaded at all.
    Both sides get the same float32 rows, the precision XGBoost and the ONNX model work in."""
    rows = np.ascontiguousarray(np.asarray(X, dtype=np.float32))
    if rows.ndim != 2 or len(rows) == 0:
        raise ValueError(f"X: need a non-empty 2-D array, got shape {rows.shape}")
    try:
        iface = interface(onnx_bytes)
    except Exception as exc:  # onnxruntime raises its own exception types for unloadable bytes
        raise ParityError(f"parity: ONNX bytes cannot be loaded: {exc}") from exc
    if iface.input_name != INPUT_NAME or OUTPUT_NAME not in [o[0] for o in iface.outputs]:
        outputs = [o[0] for o in iface.outputs]
        raise ParityError(f"parity: ONNX interface is {iface.input_name!r} -> {outputs}, "
                          f"expected {INPUT_NAME!r} -> [{OUTPUT_NAME!r}]")
    if iface.n_features != rows.shape[1]:
        raise ParityError(
            f"parity: ONNX model expects {iface.n_features} features, the data has {rows.shape[1]}")
    native = positive_scores(native_model, rows)
    exported = onnx_scores(onnx_bytes, rows)
    diff = np.abs(exported - native)
    worst = float(diff.max()) if np.isfinite(diff).all() else float("inf")
    if not worst <= tol:
        raise ParityError(f"parity: max |ONNX - native| = {worst:.3g} over {len(rows)} rows exceeds "
                          f"tolerance {tol:g}")
    return worst
