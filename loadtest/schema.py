"""Where a load test learns the feature names to send: the registry (by URL) or, without one, the
gateway's own RolloutService.ListModels (admin token) — still only over gRPC, like a customer.

For a pinned version that version's schema is used. Unpinned, traffic is routed by the split, so
every weighted version must share one schema: a named row cannot satisfy two different schemas
(the gateway rejects unknown and missing names), and the message says to pin a version instead.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import grpc

from chimera.client import channel as channel_for


class SchemaError(LookupError):
    """The model/version is unknown or the schema cannot be decided; the message says why."""


def _pick(model: str, version: int | None, schemas: Mapping[int, Sequence[str]],
          weights: Mapping[int, int]) -> tuple[str, ...]:
    if version:
        if version not in schemas:
            known = ", ".join(str(v) for v in sorted(schemas)) or "none"
            raise SchemaError(f"--version: model {model!r} has no version {version} (versions: {known})")
        return tuple(schemas[version])
    weighted = [v for v, w in weights.items() if w > 0]
    if not weighted:
        raise SchemaError(f"model {model!r} has no traffic split; pin a version with --version")
    distinct = {tuple(schemas[v]) for v in weighted if v in schemas}
    if len(distinct) != 1:
        raise SchemaError(f"versions {', '.join(map(str, sorted(weighted)))} of {model!r} have different "
                          f"feature schemas; pin one with --version")
    return distinct.pop()


def schema_from_registry(registry_url: str, model: str, version: int | None) -> tuple[str, ...]:
    """Feature names from the registry database (read-only; no migrations are run)."""
    from registry import NotFoundError, Registry

    reg = Registry(registry_url)
    try:
        info = reg.get_model(model)
    except NotFoundError as exc:
        raise SchemaError(str(exc)) from None
    finally:
        reg.dispose()
    schemas = {v.version: v.feature_names for v in info.versions}
    return _pick(model, version, schemas, info.split.weights)


def schema_from_gateway(target: str, model: str, version: int | None,
                        metadata: Sequence[tuple[str, str]], timeout_s: float = 10.0) -> tuple[str, ...]:
    """Feature names from the gateway's RolloutService.ListModels (needs the admin token)."""
    from chimera.v1 import rollout_pb2 as rpb
    from chimera.v1 import rollout_pb2_grpc

    with channel_for(target) as channel:
        stub = rollout_pb2_grpc.RolloutServiceStub(channel)
        try:
            resp = stub.ListModels(rpb.ListModelsRequest(), metadata=tuple(metadata), timeout=timeout_s)
        except grpc.RpcError as exc:
            raise SchemaError(f"could not read the feature schema from the gateway at {target}: "
                              f"{exc.code().name}: {exc.details()}") from None
    for m in resp.models:
        if m.name == model:
            schemas = {v.version: tuple(v.feature_names) for v in m.versions}
            weights = {v.version: v.weight for v in m.versions}
            return _pick(model, version, schemas, weights)
    raise SchemaError(f"model {model!r} not found on the gateway at {target}")
