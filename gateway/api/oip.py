"""The Open Inference Protocol v2 (KServe / Triton `inference.GRPCInferenceService`) on the gateway's
port: protobuf tensors to one `Predictor.submit_many` call and back, nothing else. Routing, sticky
keys, micro-batching, failover, shadowing and the prediction log are the predictor's, exactly as for
PredictBatch's packed matrix (the rows are handed over as a `PackedRows`), so a row scored here is
logged, analysed and joinable to its outcome like any other.

The tensors (what ModelMetadata announces; README "Open Inference Protocol"):

- input `input`, FP32, shape [n, n_features]: n rows of dense features in the scoring version's schema
  order, in `contents.fp32_contents` or in `raw_input_contents` (little-endian float32). Required.
- routing key: request parameter `routing_key` (string, one key for every row), or an input
  `routing_key`, BYTES, shape [n] (one per row). Not both. None: each row is routed at random.
- request ids: an input `request_id`, BYTES, shape [n], or, for a single row, the request parameter
  `request_id` (string). None: the gateway makes them. The request's own `id` field is only echoed
  (clients often reuse it, e.g. "1" on every call, and a prediction's id must be unique to be joined).
- outputs `score` FP32 [n], `version` INT32 [n], `request_id` BYTES [n], all in `raw_output_contents`
  (as Triton answers); `outputs` in the request may name a subset. A single-row answer also carries
  the response parameters `request_id` (string) and `version` (int64): parameters are scalars in this
  protocol, so per-row values travel as tensors. `model_version` is the version that scored every
  row, or "" when the rows were split over versions.
- `model_version` in a request pins a version under Predict's rule (the admin token is required).

Every bad tensor is INVALID_ARGUMENT naming the field (wrong datatype, shape, element count or raw
size, missing or unknown input, NUL or over-long key/id); an unknown model is NOT_FOUND
(gateway.api.errors maps the domain errors, as for every servicer). ModelReady answers ready=false
for an unknown model instead of an error: it is a probe."""

from __future__ import annotations

import struct
import time
from importlib import metadata
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2

from chimera.v1 import grpc_predict_v2_pb2 as pb
from chimera.v1 import grpc_predict_v2_pb2_grpc as pb_grpc
from gateway.api.auth import AdminAuth
from gateway.api.errors import status_for
from gateway.api.validate import MAX_NAME_CHARS, check_text, check_texts, detail, internal_detail, shorten
from gateway.metrics import Metrics, RequestMetrics
from gateway.serving.catalog import ModelEntry
from gateway.serving.errors import UnavailableError
from gateway.serving.features import MAX_BATCH_ROWS, PackedRows
from gateway.serving.predictor import Predictor
from gateway.serving.rows import MAX_REQUEST_ID, MAX_ROUTING_KEY
from registry import NotFoundError, ValidationError

INPUT = "input"
ROUTING_KEY = "routing_key"
REQUEST_ID = "request_id"
OUTPUTS = ("score", "version", "request_id")
PLATFORM = "onnxruntime_onnx"  # Triton's name for ONNX models run by onnxruntime, which the replicas do
_LENGTH = struct.Struct("<I")
SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]  # what gateway.server registers
add_to_server = pb_grpc.add_GRPCInferenceServiceServicer_to_server


def _server_version() -> str:
    try:
        return metadata.version("chimera-serving")
    except metadata.PackageNotFoundError:  # a source tree that was never installed
        return "unknown"


def _version_number(field: str, text: str) -> int:
    """A request's version string: "" is 0 (the server chooses), else a positive integer."""
    if not text:
        return 0
    if not text.isdigit() or int(text) <= 0 or len(text) > 9:
        raise ValidationError(f"{field}: {shorten(text)!r} is not a version number (a positive integer, or "
                              "empty to route by the split)")
    return int(text)


def _string_param(params: object, name: str) -> str | None:
    """Request parameter `name` as text, None when absent; another type is a client mistake."""
    if name not in params:  # type: ignore[operator]
        return None
    p = params[name]  # type: ignore[index]
    if p.WhichOneof("parameter_choice") != "string_param":
        raise ValidationError(f"parameters[{name!r}]: must be a string_param")
    return str(p.string_param)


def _bytes_elements(field: str, tensor: pb.ModelInferRequest.InferInputTensor, raw: bytes | None,
                    n: int) -> list[str]:
    """A BYTES tensor of shape [n] as n UTF-8 strings (typed contents or Triton's raw layout: a 4-byte
    little-endian length before each element)."""
    if tensor.datatype != "BYTES":
        raise ValidationError(f"{field}.datatype: expected BYTES, got {shorten(tensor.datatype)!r}")
    if list(tensor.shape) != [n]:
        raise ValidationError(f"{field}.shape: expected [{n}] (one per row of {INPUT!r}), "
                              f"got {list(tensor.shape)}")
    if raw is None:
        items = list(tensor.contents.bytes_contents)
        if len(items) != n:
            raise ValidationError(f"{field}.contents.bytes_contents: {len(items)} elements for shape [{n}]")
    else:
        items, at = [], 0
        while at < len(raw) and len(items) <= n:
            if at + 4 > len(raw):
                break
            (size,) = _LENGTH.unpack_from(raw, at)
            items.append(raw[at + 4:at + 4 + size])
            at += 4 + size
        if len(items) != n or at != len(raw):
            raise ValidationError(f"{field}: raw_input_contents of {len(raw)} bytes is not {n} "
                                  "length-prefixed BYTES elements")
    try:
        return [b.decode("utf-8") for b in items]
    except UnicodeDecodeError as exc:
        raise ValidationError(f"{field}: element is not UTF-8 ({exc.reason})") from None


def _features(tensor: pb.ModelInferRequest.InferInputTensor, raw: bytes | None) -> np.ndarray:
    """The [n, cols] float32 matrix of the `input` tensor (a read-only view of raw bytes, no copy)."""
    field = f"inputs[{INPUT!r}]"
    if tensor.datatype != "FP32":
        raise ValidationError(f"{field}.datatype: expected FP32, got {shorten(tensor.datatype)!r}")
    shape = list(tensor.shape)
    if len(shape) != 2 or shape[0] < 1 or shape[1] < 1:
        raise ValidationError(f"{field}.shape: expected [n, n_features] with n >= 1, got {shape[:8]}")
    n, cols = shape
    if n > MAX_BATCH_ROWS:
        raise ValidationError(f"{field}.shape: {n} rows, limit {MAX_BATCH_ROWS} per call")
    if raw is not None:
        if len(raw) != 4 * n * cols:
            raise ValidationError(f"{field}: raw_input_contents holds {len(raw)} bytes, shape {shape} of "
                                  f"FP32 needs {4 * n * cols}")
        return np.frombuffer(raw, dtype="<f4").reshape(n, cols)
    contents = tensor.contents
    for other in ("bool_contents", "int_contents", "int64_contents", "uint_contents", "uint64_contents",
                  "fp64_contents", "bytes_contents"):
        if len(getattr(contents, other)):
            raise ValidationError(f"{field}.contents.{other}: an FP32 tensor's values go in fp32_contents")
    values = contents.fp32_contents
    if len(values) != n * cols:
        raise ValidationError(f"{field}.contents.fp32_contents: {len(values)} values, shape {shape} needs "
                              f"{n * cols}")
    return np.asarray(values, dtype=np.float32).reshape(n, cols)


def _check_width(entry: ModelEntry, m: np.ndarray, pinned: int) -> None:
    """Name the tensor when its width fits none of the versions that may score it (versions with
    different schemas are left to the predictor, which checks each row against its own version), and
    refuse non-finite values here so the message names this protocol's field."""
    versions = [pinned] if pinned else list(entry.router.weights)
    widths = {entry.schemas[v].width for v in versions if v in entry.schemas}
    if len(widths) == 1 and m.shape[1] not in widths:
        (w,) = widths
        names = entry.schemas[versions[0]].names
        raise ValidationError(f"inputs[{INPUT!r}].shape: expected [n, {w}] (features in order: "
                              f"{shorten(', '.join(names), 200)}), got {list(m.shape)}")
    finite = np.isfinite(m)
    if not finite.all():
        j, i = map(int, np.argwhere(~finite)[0])
        raise ValidationError(f"inputs[{INPUT!r}]: row {j}, column {i}: value must be a finite float32, "
                              f"got {m[j, i]}")


def _scoring_version(entry: ModelEntry) -> int:
    """The version most traffic goes to (the stable one); the newest when nothing is weighted."""
    weights = entry.router.weights
    if weights:
        return max(weights, key=lambda v: (weights[v], v))
    if not entry.schemas:
        raise NotFoundError(f"version: model {entry.name!r} has no versions yet")
    return max(entry.schemas)


def _bytes_tensor(values: list[str]) -> bytes:
    parts = []
    for v in values:
        b = v.encode()
        parts.append(_LENGTH.pack(len(b)))
        parts.append(b)
    return b"".join(parts)


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """Registered by gateway.server with gateway.api.wire.register (Predict's token, the shedding cap,
    the drain). `health` is the gateway's grpc.health.v1 servicer: ServerReady answers what its overall
    status says, so it turns false the moment a drain begins, as health does for load balancers."""

    def __init__(self, predictor: Predictor, auth: AdminAuth, metrics: Metrics, health: Any,
                 failed_models: dict[str, str] | None = None) -> None:
        self.predictor = predictor
        self.auth = auth
        self.health = health
        self.requests = RequestMetrics(metrics, predictor.catalog.knows)
        self.failed_models = failed_models if failed_models is not None else {}
        self.version = _server_version()

    async def _fail(self, context: grpc.aio.ServicerContext, method: str, model: str, exc: BaseException,
                    t0: float | None = None) -> None:
        if model in self.failed_models and not self.predictor.catalog.knows(model):
            exc = UnavailableError(f"model {shorten(model)!r} is not being served: no version could start "
                                   f"({self.failed_models[model]})")
        code = status_for(exc)
        if t0 is not None:
            self.requests.observe(method, model, "", code.name, t0)
        message = internal_detail(method, exc) if code == grpc.StatusCode.INTERNAL else detail(str(exc))
        await context.abort(code, message)

    # ------------------------------------------------------------------ server
    async def ServerLive(self, request: pb.ServerLiveRequest,
                         context: grpc.aio.ServicerContext) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest,
                          context: grpc.aio.ServicerContext) -> pb.ServerReadyResponse:
        status = await self.health.Check(health_pb2.HealthCheckRequest(service=""), context)
        return pb.ServerReadyResponse(ready=status.status == health_pb2.HealthCheckResponse.SERVING)

    async def ServerMetadata(self, request: pb.ServerMetadataRequest,
                             context: grpc.aio.ServicerContext) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name="chimera", version=self.version, extensions=[])

    # ------------------------------------------------------------------ model
    async def ModelReady(self, request: pb.ModelReadyRequest,
                         context: grpc.aio.ServicerContext) -> pb.ModelReadyResponse:
        """Ready when the version's replicas are up (no version: every version the split routes to)."""
        try:
            check_text("name", request.name, MAX_NAME_CHARS)
            pinned = _version_number("version", request.version)
        except Exception as exc:
            await self._fail(context, "ModelReady", request.name, exc)
            raise
        if not self.predictor.catalog.knows(request.name):
            return pb.ModelReadyResponse(ready=False)
        entry = self.predictor.catalog.get(request.name)
        versions = [pinned] if pinned else list(entry.router.weights)
        pool = self.predictor.pool
        ready = bool(versions) and all(v in entry.schemas and pool.batcher_or_none(entry.name, v) is not None
                                       for v in versions)
        return pb.ModelReadyResponse(ready=ready)

    async def ModelMetadata(self, request: pb.ModelMetadataRequest,
                            context: grpc.aio.ServicerContext) -> pb.ModelMetadataResponse:
        """Inputs in the schema of the requested version, or of the version most traffic goes to."""
        try:
            check_text("name", request.name, MAX_NAME_CHARS)
            pinned = _version_number("version", request.version)
            entry = self.predictor.catalog.get(request.name)
            version = pinned or _scoring_version(entry)
            if version not in entry.schemas:
                raise NotFoundError(f"version: model {entry.name!r} has no version {version}")
        except Exception as exc:
            await self._fail(context, "ModelMetadata", request.name, exc)
            raise
        tensor = pb.ModelMetadataResponse.TensorMetadata
        width = entry.schemas[version].width
        return pb.ModelMetadataResponse(
            name=entry.name, versions=[str(v) for v in sorted(entry.schemas)], platform=PLATFORM,
            inputs=[tensor(name=INPUT, datatype="FP32", shape=[-1, width]),
                    tensor(name=ROUTING_KEY, datatype="BYTES", shape=[-1]),
                    tensor(name=REQUEST_ID, datatype="BYTES", shape=[-1])],
            outputs=[tensor(name="score", datatype="FP32", shape=[-1]),
                     tensor(name="version", datatype="INT32", shape=[-1]),
                     tensor(name="request_id", datatype="BYTES", shape=[-1])])

    # ------------------------------------------------------------------ inference
    def _rows(self, request: pb.ModelInferRequest) -> PackedRows:
        """The request's tensors as the predictor's packed rows (validated, fields named on error)."""
        inputs = list(request.inputs)
        raws = list(request.raw_input_contents)
        if raws and len(raws) != len(inputs):
            raise ValidationError(f"raw_input_contents: {len(raws)} entries for {len(inputs)} inputs (give "
                                  "one per input, in the order of inputs)")
        by_name: dict[str, tuple[pb.ModelInferRequest.InferInputTensor, bytes | None]] = {}
        for i, t in enumerate(inputs):
            name = t.name
            if name not in (INPUT, ROUTING_KEY, REQUEST_ID):
                raise ValidationError(f"inputs[{i}].name: unknown input {shorten(name)!r}; this model takes "
                                      f"{INPUT!r} (FP32 [n, n_features]) and optionally {ROUTING_KEY!r} and "
                                      f"{REQUEST_ID!r} (BYTES [n])")
            if name in by_name:
                raise ValidationError(f"inputs[{i}].name: input {name!r} given twice")
            if raws and t.HasField("contents"):
                raise ValidationError(f"inputs[{name!r}].contents: must be empty when raw_input_contents is "
                                      "used")
            by_name[name] = (t, raws[i] if raws else None)
        if INPUT not in by_name:
            raise ValidationError(f"inputs: missing input {INPUT!r} (FP32 [n, n_features])")
        m = _features(*by_name[INPUT])
        n = len(m)
        key = _string_param(request.parameters, ROUTING_KEY)
        if ROUTING_KEY in by_name:
            if key is not None:
                raise ValidationError(f"parameters[{ROUTING_KEY!r}]: give the routing key as a parameter or "
                                      f"as the input {ROUTING_KEY!r}, not both")
            keys = _bytes_elements(f"inputs[{ROUTING_KEY!r}]", *by_name[ROUTING_KEY], n)
        else:
            keys = [key or ""] * n
        rid = _string_param(request.parameters, REQUEST_ID)
        if REQUEST_ID in by_name:
            if rid is not None:
                raise ValidationError(f"parameters[{REQUEST_ID!r}]: give request ids as a parameter or as "
                                      f"the input {REQUEST_ID!r}, not both")
            ids = _bytes_elements(f"inputs[{REQUEST_ID!r}]", *by_name[REQUEST_ID], n)
        elif rid is not None:
            if n != 1:
                raise ValidationError(f"parameters[{REQUEST_ID!r}]: one id for {n} rows; give the input "
                                      f"{REQUEST_ID!r} (BYTES [n]) instead")
            ids = [rid]
        else:
            ids = [""] * n
        for field, values, limit in ((ROUTING_KEY, keys, MAX_ROUTING_KEY), (REQUEST_ID, ids, MAX_REQUEST_ID)):
            check_texts(field, values)
            longest = max(map(len, values))
            if longest > limit:
                raise ValidationError(f"{field}: {longest} characters, limit {limit}")
        return PackedRows(m, keys, ids)

    async def ModelInfer(self, request: pb.ModelInferRequest,
                         context: grpc.aio.ServicerContext) -> pb.ModelInferResponse:
        t0 = time.perf_counter()
        model = request.model_name
        try:
            check_text("model_name", model, MAX_NAME_CHARS)
            pinned = _version_number("model_version", request.model_version)
            wanted = [o.name for o in request.outputs] or list(OUTPUTS)
            for name in wanted:
                if name not in OUTPUTS:
                    raise ValidationError(f"outputs: unknown output {shorten(name)!r}; this model gives "
                                          f"{', '.join(OUTPUTS)}")
            entry = self.predictor.catalog.get(model)
            rows = self._rows(request)
            _check_width(entry, rows.matrix, pinned)
            if pinned:
                self.auth.actor(context)
            remaining = context.time_remaining()
            if remaining is not None and remaining <= 0:
                raise TimeoutError("deadline exceeded before the request was scored")
            result = await self.predictor.submit_many(model, rows, pinned, remaining)
        except Exception as exc:
            await self._fail(context, "ModelInfer", model, exc, t0)
            raise  # unreachable: abort raises
        n = len(result.scores)
        served = set(result.versions)
        response = pb.ModelInferResponse(model_name=model, id=request.id,
                                         model_version=str(result.versions[0]) if len(served) == 1 else "")
        if n == 1:
            response.parameters["request_id"].string_param = result.request_ids[0]
            response.parameters["version"].int64_param = result.versions[0]
        data = {"score": ("FP32", lambda: np.asarray(result.scores, dtype="<f4").tobytes()),
                "version": ("INT32", lambda: np.asarray(result.versions, dtype="<i4").tobytes()),
                "request_id": ("BYTES", lambda: _bytes_tensor(result.request_ids))}
        for name in wanted:
            datatype, raw = data[name]
            response.outputs.add(name=name, datatype=datatype, shape=[n])
            response.raw_output_contents.append(raw())
        self.requests.observe("ModelInfer", model, result.versions[0] if len(served) == 1 else "", "OK", t0)
        return response
