"""Routing policy: which version scores a request.

Weighted rendezvous hashing: every version gets score -ln(u(key, version)) / weight and the lowest
score wins. Each version receives exactly its weight's share of keys, a key keeps its version while
the split is unchanged, and when one version's weight grows while the others shrink no key leaves
the growing version (monotone), which `hash % n` bucketing cannot promise. No key: random.

Rendezvous hashing costs a blake2b per version per request; real traffic repeats its keys (users,
instruments), so each Router remembers its decisions by key. A Router belongs to one split revision
(the split watcher swaps it whole), so the cache never outlives the split it was computed for; it is
cleared when it holds ROUTE_CACHE_MAX keys."""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Mapping
from dataclasses import dataclass

_TWO64 = float(2**64)
ROUTE_CACHE_MAX = 200_000  # routing keys remembered per Router (one split revision of one model)


def _unit(key: str, version: int) -> float:
    """Uniform in (0, 1), stable across processes and Python versions (no hash randomisation)."""
    digest = hashlib.blake2b(f"{version}\x1f{key}".encode(), digest_size=8).digest()
    return (int.from_bytes(digest, "big") + 0.5) / _TWO64


@dataclass(frozen=True)
class Router:
    """Immutable routing table for one split revision; swapped whole when the split changes."""

    weights: Mapping[int, int]

    def __post_init__(self) -> None:
        live = {v: w for v, w in self.weights.items() if w > 0}
        object.__setattr__(self, "weights", live)
        object.__setattr__(self, "_versions", tuple(sorted(live)))
        object.__setattr__(self, "_cum", tuple(live[v] for v in sorted(live)))
        object.__setattr__(self, "_cache", {})

    @property
    def versions(self) -> tuple[int, ...]:
        return self._versions  # type: ignore[attr-defined,no-any-return]

    def route(self, routing_key: str) -> int:
        """The version for `routing_key` (remembered while this Router lives). Raises LookupError when
        no version has weight."""
        if routing_key:
            cache: dict[str, int] = self._cache  # type: ignore[attr-defined]
            version = cache.get(routing_key)
            if version is None:
                version = self._pick(routing_key)
                if len(cache) >= ROUTE_CACHE_MAX:
                    cache.clear()
                cache[routing_key] = version
            return version
        return self._pick(routing_key)

    def route_many(self, keys: list[str]) -> list[int]:
        """The version of each key, as a new list. One C-level pass when every key is known already."""
        if len(self.weights) == 1:
            return [next(iter(self.weights))] * len(keys)
        versions = list(map(self._cache.get, keys))  # type: ignore[attr-defined]
        if None in versions:
            route = self.route
            return [route(k) for k in keys]
        return versions  # type: ignore[return-value]

    def _pick(self, routing_key: str) -> int:
        if not self.weights:
            raise LookupError("split has no version with weight > 0")
        if len(self.weights) == 1:
            return next(iter(self.weights))
        if not routing_key:
            return random.choices(self._versions, weights=self._cum)[0]  # type: ignore[attr-defined]
        best_version = -1
        best = math.inf
        for version, weight in self.weights.items():
            score = -math.log(_unit(routing_key, version)) / weight
            if score < best:
                best, best_version = score, version
        return best_version
