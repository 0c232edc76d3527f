"""`chimera bench`'s Ray side: a local Ray (num_cpus=2) with Serve's own gRPC proxy, and the Ray Serve
"native" application the gateway is compared with."""

from __future__ import annotations

import hashlib
import os
import uuid
from typing import Any

import numpy as np

from loadtest.ports import free_port

NATIVE_APP = "ray-native-bench"
_handle_loop: Any = None  # handle_c1's event loop (asyncio.AbstractEventLoop), closed by stop_ray_serve


def start_ray() -> None:
    """A local Ray with 2 CPUs for the bench's own use; `stop_ray_serve` shuts it down."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)


def start_serve() -> int:
    """Serve with its gRPC proxy serving chimera.v1.PredictionService; returns the proxy's port."""
    from ray import serve
    from ray.serve.config import HTTPOptions, gRPCOptions

    grpc_port = free_port()
    serve.start(http_options=HTTPOptions(host="127.0.0.1", port=free_port()),
                grpc_options=gRPCOptions(port=grpc_port, grpc_servicer_functions=[
                    "chimera.v1.prediction_pb2_grpc.add_PredictionServiceServicer_to_server"]))
    return grpc_port


def gcs_address() -> str:
    """Where a gateway process joins this Ray cluster (its RAY_ADDRESS)."""
    import ray

    return str(ray.get_runtime_context().gcs_address)


def stop_ray_serve() -> None:
    import asyncio

    import ray
    from ray import serve

    global _handle_loop
    try:
        serve.shutdown()
        if _handle_loop is not None:  # let the routers' shutdowns that serve.shutdown scheduled run
            pending = asyncio.all_tasks(_handle_loop)
            if pending:
                _handle_loop.run_until_complete(asyncio.wait(pending, timeout=5))
    finally:
        if _handle_loop is not None:
            _handle_loop.close()
            _handle_loop = None
        ray.shutdown()


def run_native_app(onnx_bytes: bytes, feature_names: list[str]) -> None:
    from ray import serve

    serve.run(native_deployment(onnx_bytes, feature_names), name=NATIVE_APP, route_prefix=f"/{NATIVE_APP}")


def handle_c1(request: Any, seconds: float, warmup_s: float) -> dict[str, Any]:
    """One Ray Serve handle call at a time from this process to the native app's replica, with the
    handle options the gateway uses (its router on the caller's event loop, Serve's direct gRPC
    transport to the replica; gateway.serving.replica_pool): what one Ray call costs with no gRPC
    server, routing or logging around it. The anchor of the c=1 target: the gateway makes one such
    call per idle request, so its c=1 p50 over the do-nothing server's is read against this call's p50
    (measured from the bench's own process, so an approximation of the gateway's call, not a bound)."""
    import asyncio
    import time

    from ray import serve

    from loadtest.bench_onnx import percentiles_ms

    async def run() -> dict[str, Any]:
        handle = serve.get_app_handle(NATIVE_APP)
        handle._init(_run_router_in_separate_loop=False)  # must run inside the loop it will use
        method = handle.Predict.options(_by_reference=False)
        end = time.perf_counter() + warmup_s
        while time.perf_counter() < end:
            await method.remote(request)
        lat: list[float] = []
        started = time.perf_counter()
        end = started + seconds
        while (t0 := time.perf_counter()) < end:
            await method.remote(request)
            lat.append(time.perf_counter() - t0)
        elapsed = time.perf_counter() - started
        p50, p99 = percentiles_ms(lat)
        return {"kind": "Ray Serve handle call, c=1", "requests": len(lat), "rps": len(lat) / elapsed,
                "rows_per_s": len(lat) / elapsed, "p50_ms": p50, "p99_ms": p99}

    # The handle is cached by Serve and its router lives on this loop, so the loop stays open until
    # `stop_ray_serve`, whose serve.shutdown schedules the router's own shutdown on it.
    global _handle_loop
    _handle_loop = _handle_loop or asyncio.new_event_loop()
    return _handle_loop.run_until_complete(run())


def delete_native_app() -> None:
    from ray import serve

    serve.delete(NATIVE_APP)


def native_deployment(onnx_bytes: bytes, feature_names: list[str]) -> Any:
    """Ray Serve's documented gRPC pattern: a deployment whose method is named after the RPC, taking
    and returning the protobuf messages; Ray's proxy routes by the `application` metadata. It scores
    one row per call, with the same projection rules as the gateway. Ray Serve defaults except
    max_ongoing_requests: at the default (5) a closed loop of 64 callers makes the proxy's router back
    off for up to 0.5 s per retry (measured: 5-20 req/s), which would flatter Chimera; 128 lets the
    replica take every caller, which is Ray's best case here."""
    from ray import serve

    @serve.deployment(name="native", max_ongoing_requests=128, ray_actor_options={"num_cpus": 0.25})
    class NativePredictor:
        def __init__(self, data: bytes, names: list[str]) -> None:
            from replicas.scorer import OnnxScorer

            self.scorer = OnnxScorer(data, hashlib.sha256(data).hexdigest())
            self.names = list(names)

        def Predict(self, request: Any) -> Any:  # noqa: N802 - the gRPC method name
            from chimera.v1 import prediction_pb2 as pb

            if request.dense:
                row = np.asarray(list(request.dense), dtype=np.float32)
            else:
                row = np.asarray([request.features[n] for n in self.names], dtype=np.float32)
            score = float(self.scorer.score(row.reshape(1, -1))[0])
            return pb.PredictResponse(request_id=request.request_id or uuid.uuid4().hex,
                                      model=request.model, version=1, score=score)

    return NativePredictor.bind(onnx_bytes, feature_names)
