"""The gateway's in-memory view of the registry: per model its router (current split) and the
feature schema of each version. Requests read it without any database round trip; the split
watcher swaps a model's entry whole when its revision changes."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from gateway.serving.features import Schema
from gateway.serving.router import Router
from registry import ModelInfo, NotFoundError, Registry
from rollout import splits
from rollout.covariate import ADJUSTABLE_METRICS

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelEntry:
    name: str
    metric: str
    revision: int
    router: Router
    schemas: dict[int, Schema] = field(default_factory=dict)
    shadow: int | None = None  # mirror version, scored off the request path
    # The baseline whose score is the covariate of the canary's rows (rollout.covariate), mirrored off
    # the request path like the shadow; None: no covariate mirroring (see covariate_source).
    covariate_from: int | None = None


class Catalog:
    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self._models: dict[str, ModelEntry] = {}

    def get(self, model: str) -> ModelEntry:
        entry = self._models.get(model)
        if entry is None:
            raise NotFoundError(f"model: {model!r} is not a registered model" if model
                                else "model: required")
        return entry

    def knows(self, model: str) -> bool:
        return model in self._models

    def names(self) -> list[str]:
        return sorted(self._models)

    def revisions(self) -> dict[str, tuple[int, int]]:
        """Comparable with Registry.split_revisions(): (split revision, newest version)."""
        return {n: (e.revision, max(e.schemas, default=0)) for n, e in self._models.items()}

    def load(self, model: str) -> ModelEntry:
        """Read one model from the registry (blocking; call from a thread). Does not install it."""
        info = self.registry.get_model(model)
        known = {name for v in info.versions for name in v.feature_names}
        schemas = {v.version: Schema(v.feature_names, known) for v in info.versions}
        return ModelEntry(name=info.name, metric=info.metric, revision=info.split.revision,
                          router=Router(dict(info.split.weights)), schemas=schemas,
                          shadow=info.split.shadow,
                          covariate_from=covariate_source(info, self.registry.rollout_config(model)))

    def install(self, entry: ModelEntry) -> None:
        """Swap in a model's routing table, unless a newer split revision is already installed: two
        syncs of one model can overlap (the watcher's, and the one an admin call on this gateway
        runs), and the one that read the registry first must not undo the other."""
        current = self._models.get(entry.name)
        if current is not None and entry.revision < current.revision:
            return
        self._models[entry.name] = entry

    def remove(self, model: str) -> None:
        self._models.pop(model, None)

    def all_model_names(self) -> list[str]:
        try:
            return self.registry.model_names()
        except NotFoundError:
            return []


def covariate_source(info: ModelInfo, config: dict | None) -> int | None:
    """The version whose score the canary's rows need as their covariate: the baseline of the split's
    (baseline, canary) pair (the controller's own choice of arms), when the model's metric is a business
    metric and its rollout policy names ``production_score``; else None. Read with the split (one small
    read per split change, none per request): a policy change reaches the gateways with the next split
    change, which is when a canary starts. A policy that does not parse mirrors nothing (the controller
    reports its error)."""
    pair = splits.arms(info.split.weights, {v.version: v.status for v in info.versions})
    if pair is None or info.metric not in ADJUSTABLE_METRICS:
        return None
    try:
        policy = splits.policy_from_dict(config, metric=info.metric)
    except ValueError as exc:
        log.warning("model %s: stored rollout policy does not parse (%s); no covariate mirror",
                    info.name, exc)
        return None
    return pair[0] if policy.covariate == "production_score" else None
