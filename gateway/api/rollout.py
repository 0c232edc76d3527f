"""gRPC RolloutService (admin): traffic splits, promotion, rollback, rollout status, replica scaling.
Thin: every call checks the admin token, then hands a domain call to a worker thread."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import grpc

from chimera.v1 import rollout_pb2 as rpb
from chimera.v1 import rollout_pb2_grpc as rpb_grpc
from gateway.api.auth import AdminAuth
from gateway.api.errors import status_for as _status
from gateway.api.validate import MAX_NAME_CHARS, check_text, detail, internal_detail
from gateway.serving.replica_pool import ReplicaPool, scaling_plan
from registry import Registry
from rollout import operations as rollout_ops
from rollout.controller import PromotionGate
from rollout.policy import SCALING_FIELDS

log = logging.getLogger(__name__)

APPLY_WAIT_S = 5.0  # longest an admin call waits for this gateway to route by the change it made


class RolloutServicer(rpb_grpc.RolloutServiceServicer):
    def __init__(self, registry: Registry, auth: AdminAuth, gate: PromotionGate | None = None,
                 on_change: Callable[[str], Awaitable[object]] | None = None,
                 pool: ReplicaPool | None = None) -> None:
        self.registry = registry
        self.auth = auth
        self.gate = gate
        self.on_change = on_change
        self.pool = pool  # applies a scaling change here at once and knows the replica counts

    async def _applied(self, model: str) -> None:
        """Route by a split change on this gateway before answering the call that made it (other
        gateways follow within a second through the watcher). A newly weighted version's replicas may
        take longer to deploy than the caller wants to wait: after APPLY_WAIT_S the sync goes on in the
        background and the call returns; the version gets traffic once it can answer."""
        if self.on_change is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(self.on_change(model)), APPLY_WAIT_S)
        except TimeoutError:
            pass
        except Exception:  # the watcher retries on its own; the change itself is committed
            log.warning("model %s: applying the split change here failed; the watcher will", model,
                        exc_info=True)

    @staticmethod
    async def _abort(context: grpc.aio.ServicerContext, exc: BaseException) -> None:
        code = _status(exc)
        message = (internal_detail("RolloutService", exc) if code == grpc.StatusCode.INTERNAL
                   else detail(str(exc) or type(exc).__name__))
        await context.abort(code, message)

    async def _call(self, context: grpc.aio.ServicerContext, fn, *args, **kwargs):  # noqa: ANN001, ANN202
        try:
            return await asyncio.to_thread(fn, *args, **kwargs)
        except Exception as exc:
            await self._abort(context, exc)

    async def _actor(self, context: grpc.aio.ServicerContext, request: object = None) -> str:
        """Check the admin token, then the request's text fields (gateway.api.validate: nothing the
        registry database would refuse reaches it); returns the actor for the audit log."""
        try:
            actor = self.auth.actor(context)
            check_text("actor", actor)
            if request is not None:
                model = getattr(request, "model", None)
                if model is not None:
                    check_text("model", model, MAX_NAME_CHARS)
                reason = getattr(request, "reason", None)
                if reason is not None:
                    check_text("reason", reason, 4096)
            return actor
        except Exception as exc:
            await self._abort(context, exc)
            raise

    def _scaling(self, model: str) -> rpb.Scaling:
        """Blocking: the model's replica fields and what each deployed or live version runs."""
        default = self.pool.scaling if self.pool is not None else None
        config = self.registry.rollout_config(model)
        stored = {k: config[k] for k in SCALING_FIELDS if config.get(k) is not None}
        out = rpb.Scaling(model=model, policy=rpb.ScalingPolicy(**stored))
        if default is None:
            return out
        ready = {v for m, v in self.pool.ready_versions() if m == model}
        counts = self.pool.replicas
        for version, plan in sorted(scaling_plan(self.registry, model, default).items()):
            if not (plan.live or version in ready):
                continue
            sc = plan.scaling
            out.versions.append(rpb.VersionScaling(
                version=version, role=plan.role, replicas_min=sc.min_replicas, replicas_max=sc.max_replicas,
                target_ongoing_requests=sc.target_ongoing_requests, upscale_delay_s=sc.upscale_delay_s,
                downscale_delay_s=sc.downscale_delay_s, replicas=counts.get((model, version), -1)))
        return out

    async def SetScaling(
        self, request: rpb.SetScalingRequest, context: grpc.aio.ServicerContext
    ) -> rpb.Scaling:
        actor = await self._actor(context, request)
        given = {f: getattr(request.scaling, f) for f in SCALING_FIELDS if request.scaling.HasField(f)}
        await self._call(context, rollout_ops.store_scaling, self.registry, request.model, given,
                         reset=request.reset)
        log.info("model %s: replica scaling set by %s (%s%s): %s", request.model, actor,
                 "reset, " if request.reset else "", request.reason or "no reason given", given)
        if self.pool is not None:
            try:  # this gateway applies it now; every gateway's scaling watch would within seconds
                await asyncio.wait_for(asyncio.shield(self.pool.apply_scaling(request.model)), APPLY_WAIT_S)
            except TimeoutError:
                pass
            except Exception:  # stored; the scaling watch retries
                log.warning("model %s: applying the scaling here failed; the scaling watch will",
                            request.model, exc_info=True)
        return await self._call(context, self._scaling, request.model)

    async def GetScaling(
        self, request: rpb.GetScalingRequest, context: grpc.aio.ServicerContext
    ) -> rpb.Scaling:
        await self._actor(context, request)
        return await self._call(context, self._scaling, request.model)

    @staticmethod
    def _split(split) -> rpb.TrafficSplit:  # noqa: ANN001
        return rpb.TrafficSplit(
            shadow_version=split.shadow or 0,
            model=split.model,
            revision=split.revision,
            weights=[rpb.VersionWeight(version=v, weight=w) for v, w in sorted(split.weights.items())],
        )

    async def GetTrafficSplit(
        self, request: rpb.GetTrafficSplitRequest, context: grpc.aio.ServicerContext
    ) -> rpb.TrafficSplit:
        await self._actor(context, request)
        return self._split(await self._call(context, self.registry.get_split, request.model))

    async def SetTrafficSplit(
        self, request: rpb.SetTrafficSplitRequest, context: grpc.aio.ServicerContext
    ) -> rpb.TrafficSplit:
        actor = await self._actor(context, request)
        weights: dict[int, int] = {}
        for w in request.weights:
            if w.version in weights:
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT, f"weights: version {w.version} appears twice"
                )
            weights[w.version] = w.weight
        # force skips the optimistic check (operator override); the audit row records it.
        expected = None if request.force else request.expected_revision
        split = await self._call(
            context,
            rollout_ops.set_split,
            self.registry,
            request.model,
            weights,
            expected_revision=expected,
            actor=actor,
            reason=request.reason,
            forced=request.force,
        )
        await self._applied(request.model)
        return self._split(split)

    async def ListModels(
        self, request: rpb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> rpb.ListModelsResponse:
        await self._actor(context, request)
        models = await self._call(context, self.registry.list_models)
        return rpb.ListModelsResponse(
            models=[
                rpb.ModelInfo(
                    name=m.name,
                    metric=m.metric,
                    revision=m.split.revision,
                    versions=[
                        rpb.ModelVersionInfo(
                            version=v.version,
                            status=v.status,
                            sha256=v.sha256,
                            feature_names=list(v.feature_names),
                            metrics={k: float(x) for k, x in v.metrics.items() if isinstance(x, int | float)},
                            weight=m.split.weights.get(v.version, 0),
                        )
                        for v in m.versions
                    ],
                )
                for m in models
            ]
        )

    async def Promote(
        self, request: rpb.PromoteRequest, context: grpc.aio.ServicerContext
    ) -> rpb.TrafficSplit:
        actor = await self._actor(context, request)
        split = await self._call(
            context,
            rollout_ops.promote,
            self.registry,
            request.model,
            request.version,
            actor=actor,
            reason=request.reason,
            force=request.force,
            gate=self.gate,
        )
        await self._applied(request.model)
        return self._split(split)

    async def Rollback(
        self, request: rpb.RollbackRequest, context: grpc.aio.ServicerContext
    ) -> rpb.TrafficSplit:
        actor = await self._actor(context, request)
        split = await self._call(
            context,
            rollout_ops.rollback,
            self.registry,
            request.model,
            request.version,
            actor=actor,
            reason=request.reason,
        )
        await self._applied(request.model)
        return self._split(split)

    async def SetShadow(
        self, request: rpb.SetShadowRequest, context: grpc.aio.ServicerContext
    ) -> rpb.TrafficSplit:
        actor = await self._actor(context, request)
        split = await self._call(
            context,
            self.registry.set_shadow,
            request.model,
            request.version or None,
            actor=actor,
            reason=request.reason,
        )
        await self._applied(request.model)
        return self._split(split)

    async def GetRolloutStatus(
        self, request: rpb.GetRolloutStatusRequest, context: grpc.aio.ServicerContext
    ) -> rpb.RolloutStatus:
        await self._actor(context, request)
        s = await self._call(
            context, rollout_ops.status, self.registry, request.model, request.decisions or 5
        )

        def num(x: float | None) -> float:
            return float("nan") if x is None else float(x)

        scaling = await self._call(context, self._scaling, request.model)
        return rpb.RolloutStatus(
            scaling=scaling,
            model=s.model,
            metric=s.metric,
            revision=s.revision,
            started_at=s.started_at.isoformat() if s.started_at else "",
            arms=[
                rpb.ArmStatus(
                    version=a.version,
                    status=a.status,
                    weight=a.weight,
                    role=a.role,
                    requests=a.requests,
                    outcomes=a.outcomes,
                    metric_value=a.metric_value,
                )
                for a in s.arms
            ],
            decisions=[
                rpb.DecisionRecord(
                    id=d["id"],
                    action=d["action"],
                    baseline_version=d["baseline_version"],
                    canary_version=d["canary_version"],
                    test=d["test"],
                    statistic=num(d["statistic"]),
                    p_value=num(d["p_value"]),
                    n_baseline=d["n_baseline"],
                    n_canary=d["n_canary"],
                    mean_baseline=num(d["mean_baseline"]),
                    mean_canary=num(d["mean_canary"]),
                    weight_before=d["weight_before"],
                    weight_after=d["weight_after"],
                    reason=d["reason"],
                    created_at=d["created_at"].isoformat(),
                )
                for d in s.decisions
            ],
        )

