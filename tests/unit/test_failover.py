"""Unit checks of gateway.serving.failover (which version takes a down version's rows, counting, probing)."""

from __future__ import annotations

import asyncio

import pytest

from gateway.metrics import Metrics
from gateway.serving.errors import UnavailableError
from gateway.serving.failover import VersionHealth


def test_fallback_is_the_heaviest_healthy_other_version() -> None:
    h = VersionHealth()
    weights = {1: 80, 2: 10, 3: 10}
    assert h.fallback("m", 2, weights) == 1
    assert h.fallback("m", 1, weights) == 2  # tie between 2 and 3: the older version
    h.down[("m", 1)] = "dead"
    assert h.fallback("m", 2, weights) == 3 and h.is_down("m", 1) and not h.is_down("m", 2)
    assert h.fallback("m", 1, {1: 100}) is None
    err = h.unavailable("m", 1)
    assert isinstance(err, UnavailableError) and "version 1 of 'm' is unavailable (dead)" in str(err)


def test_counts_reach_the_metrics() -> None:
    metrics = Metrics()
    h = VersionHealth(metrics=metrics)
    h.failed_over("m", 2, 5)
    h.failed("m", 2)
    assert h.failure_count("m", 2) == 6 and h.failovers[("m", 2)] == 5 and h.failure_count("m", 1) == 0
    r = metrics.registry
    assert r.get_sample_value("chimera_failovers_total", {"model": "m", "from_version": "2"}) == 5
    assert r.get_sample_value("chimera_version_failures_total", {"model": "m", "version": "2"}) == 6


def test_probe_marks_the_version_up_when_it_answers() -> None:
    async def scenario() -> None:
        h = VersionHealth(probe_interval_s=0.01)
        calls = {"n": 0}

        async def probe() -> None:
            calls["n"] += 1
            if calls["n"] < 3:
                raise TimeoutError("still restarting")

        h.mark_down("m", 2, "no answer", probe)
        h.mark_down("m", 2, "no answer again", probe)  # one probe per version
        assert h.is_down("m", 2)
        for _ in range(200):
            if not h.is_down("m", 2):
                break
            await asyncio.sleep(0.01)
        assert not h.is_down("m", 2) and calls["n"] == 3
        await h.close()

    asyncio.run(scenario())


def test_tolerant_deserializer_marks_undecodable_bytes() -> None:
    from chimera.v1 import prediction_pb2 as pb
    from gateway.api.wire import Malformed, tolerant

    parse = tolerant(pb.PredictRequest.FromString, "chimera.v1.PredictRequest")
    assert parse(pb.PredictRequest(model="m").SerializeToString()).model == "m"
    bad = parse(b"\xff\xff")
    assert isinstance(bad, Malformed) and "not a valid chimera.v1.PredictRequest" in bad.message


@pytest.mark.parametrize("header, ok", [("Bearer p", True), ("Bearer a", True), ("bearer p", True),
                                        ("Bearer x", False), ("p", False), ("", False)])
def test_token_auth_accepts_either_token(header: str, ok: bool) -> None:
    from gateway.api.auth import AuthError, TokenAuth

    class Ctx:
        def invocation_metadata(self):
            return [type("M", (), {"key": "authorization", "value": header})()] if header else []

    auth = TokenAuth("p", "a")
    if ok:
        auth.check(Ctx())
    else:
        with pytest.raises(AuthError):
            auth.check(Ctx())
