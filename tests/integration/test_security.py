"""chimera.security: the start-up refusal rules `chimera serve` applies before it opens a port (weak or
placeholder tokens, tokens in clear text on the network, open predictions/outcomes on the network)."""

from __future__ import annotations

import secrets

import pytest

from chimera.security import (
    MIN_TOKEN_LENGTH,
    ServeSecurity,
    StartupRefused,
    check_startup,
    is_loopback,
    startup_problems,
    token_problem,
    token_problems,
)

GOOD = secrets.token_hex(32)
GOOD2 = secrets.token_urlsafe(24)
GOOD3 = secrets.token_hex(16)


@pytest.mark.parametrize("token", ["change-me", "CHANGE-ME", "changeme", "Change_Me", "secret", "admin",
                                   "password", "token", "chimera",
                                   "change-me-to-something-long-please", "replace-me-0123456789abcdef",
                                   "<placeholder-token-value-here>", "example-token-0123456789"])
def test_placeholder_tokens_are_refused(token: str) -> None:
    problem = token_problem("CHIMERA_ADMIN_TOKEN", token)
    assert problem is not None and "CHIMERA_ADMIN_TOKEN" in problem
    assert "openssl rand -hex 32" in problem  # says what to do


@pytest.mark.parametrize("token,why", [
    ("a1b2c3d4e5f6a7b", "fewer than 16"),  # 15 characters
    ("abababababababababab", "distinct"),
    ("aaaaaaaaaaaaaaaaaaaaaaaa", "distinct"),
    ("", "empty"),
    # ids of their own: a random token in a test's id differs between xdist's workers (make test)
    pytest.param(GOOD + "\n", "whitespace", id="good-then-newline"),
    pytest.param(" " + GOOD, "whitespace", id="space-then-good"),
    pytest.param(GOOD[:20] + "é" + GOOD[20:], "printable ASCII", id="good-with-e-acute"),
    pytest.param(GOOD[:20] + "\x00" + GOOD[20:], "printable ASCII", id="good-with-nul"),
])
def test_weak_or_malformed_tokens_are_refused(token: str, why: str) -> None:
    problem = token_problem("CHIMERA_PREDICT_TOKEN", token)
    assert problem is not None and why in problem, problem


@pytest.mark.parametrize("token", [GOOD, GOOD2, GOOD3, "Xk9#mQ2$vL7!pR4w"],
                         ids=["hex-32", "urlsafe-24", "hex-16", "symbols-16"])
def test_strong_tokens_and_unset_pass(token: str) -> None:
    assert len(GOOD3) >= MIN_TOKEN_LENGTH
    assert token_problem("CHIMERA_ADMIN_TOKEN", token) is None
    assert token_problem("CHIMERA_ADMIN_TOKEN", None) is None  # unset: judged by the bind rules


def test_every_weak_token_is_listed_and_admin_must_not_be_shared() -> None:
    problems = token_problems({"CHIMERA_ADMIN_TOKEN": "change-me", "CHIMERA_PREDICT_TOKEN": "secret",
                               "CHIMERA_OUTCOMES_TOKEN": GOOD})
    assert [p.split()[0] for p in problems] == ["CHIMERA_ADMIN_TOKEN", "CHIMERA_PREDICT_TOKEN"]
    shared = token_problems({"CHIMERA_ADMIN_TOKEN": GOOD, "CHIMERA_PREDICT_TOKEN": GOOD})
    assert len(shared) == 1 and "equals CHIMERA_ADMIN_TOKEN" in shared[0]
    assert token_problems({"CHIMERA_ADMIN_TOKEN": GOOD, "CHIMERA_PREDICT_TOKEN": GOOD2}) == []


@pytest.mark.parametrize("host,loopback", [
    ("127.0.0.1", True), ("127.0.0.53", True), ("::1", True), ("[::1]", True), ("localhost", True),
    ("0.0.0.0", False), ("::", False), ("[::]", False), ("", False), ("10.0.0.5", False),
    ("192.168.1.2", False), ("gateway.example.com", False), ("fe80::1", False),
])
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_loopback_serves_without_tls_or_tokens() -> None:
    """`chimera serve --host 127.0.0.1` (the demo, a laptop) needs neither TLS nor tokens."""
    assert check_startup(ServeSecurity(host="127.0.0.1")) == []
    assert check_startup(ServeSecurity(host="localhost", admin_token=GOOD)) == []


def test_plaintext_with_tokens_on_the_network_is_refused_with_what_to_do() -> None:
    s = ServeSecurity(host="0.0.0.0", admin_token=GOOD, predict_token=GOOD2)
    with pytest.raises(StartupRefused) as err:
        check_startup(s)
    msg = str(err.value)
    assert "plaintext" in msg and "CHIMERA_ADMIN_TOKEN" in msg and "clear text" in msg
    for hint in ("CHIMERA_TLS_CERT", "--host 127.0.0.1", "--insecure"):
        assert hint in msg
    assert GOOD not in msg and GOOD2 not in msg  # never echo a token
    # TLS closes it.
    assert check_startup(ServeSecurity(host="0.0.0.0", tls=True, admin_token=GOOD, predict_token=GOOD2)) == []


def test_insecure_waives_the_bind_rules_but_says_so() -> None:
    s = ServeSecurity(host="0.0.0.0", admin_token=GOOD, predict_token=GOOD2, insecure=True)
    warnings = check_startup(s)
    assert len(warnings) == 1 and warnings[0].startswith("--insecure:") and "clear text" in warnings[0]
    open_ = check_startup(ServeSecurity(host="0.0.0.0", insecure=True))
    assert len(open_) == 1 and "open" in open_[0]


def test_insecure_never_waives_a_weak_token() -> None:
    with pytest.raises(StartupRefused, match="placeholder"):
        check_startup(ServeSecurity(host="0.0.0.0", admin_token="change-me", insecure=True))
    with pytest.raises(StartupRefused, match="placeholder"):
        check_startup(ServeSecurity(host="127.0.0.1", admin_token="change-me"))  # even on loopback


def test_open_predictions_or_outcomes_on_the_network_are_refused() -> None:
    with pytest.raises(StartupRefused) as err:  # no token at all, TLS on: still open doors
        check_startup(ServeSecurity(host="0.0.0.0", tls=True))
    assert "predictions (Predict*) and outcomes (RecordOutcome*) open" in str(err.value)
    # Admin token only: Predict and RecordOutcome still open.
    with pytest.raises(StartupRefused, match="open to anyone"):
        check_startup(ServeSecurity(host="0.0.0.0", tls=True, admin_token=GOOD))
    # Outcomes guarded by their own token while predictions are open: predictions named alone.
    with pytest.raises(StartupRefused) as err:
        check_startup(ServeSecurity(host="0.0.0.0", tls=True, outcomes_token=GOOD3))
    assert "predictions (Predict*) open" in str(err.value) and "outcomes (RecordOutcome" not in str(err.value)
    # The predict token guards outcomes unless the gateway keeps outcomes open regardless.
    assert check_startup(ServeSecurity(host="0.0.0.0", tls=True, predict_token=GOOD2)) == []
    with pytest.raises(StartupRefused, match=r"outcomes \(RecordOutcome\*\) open"):
        check_startup(ServeSecurity(host="0.0.0.0", tls=True, predict_token=GOOD2,
                                    outcomes_use_predict_token=False))


def test_client_certificates_authenticate_every_door() -> None:
    """Mutual TLS: every caller shows a certificate, so predictions and outcomes are not open."""
    assert check_startup(ServeSecurity(host="0.0.0.0", tls=True, client_certs=True)) == []


def test_every_problem_is_reported_at_once() -> None:
    refusals, warnings = startup_problems(ServeSecurity(host="0.0.0.0", admin_token="admin"))
    assert warnings == [] and len(refusals) == 3  # weak token, clear text, open doors
    err = StartupRefused(refusals)
    assert err.problems == refusals and str(err).count("\n  - ") == 3


# ------------------------------------------------------------------ `chimera serve` applies the rules
def _serve(monkeypatch: pytest.MonkeyPatch, tmp_path, args: list[str], **env: str):  # noqa: ANN001, ANN202
    """Run `chimera serve` with the gateway itself replaced by a recorder; (exit code, output, configs)."""
    import re

    from typer.testing import CliRunner

    from chimera.cli import app

    configs: list = []

    async def serve_forever(config) -> None:  # noqa: ANN001
        configs.append(config)

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("gateway.server.serve_forever", serve_forever)
    monkeypatch.setattr("gateway.server.ensure_ray", lambda *a, **k: None)
    base = {"CHIMERA_REGISTRY_URL": f"sqlite:///{tmp_path / 'serve.db'}", "COLUMNS": "200",
            "CHIMERA_ADMIN_TOKEN": "", "CHIMERA_PREDICT_TOKEN": "", "CHIMERA_OUTCOMES_TOKEN": "",
            "CHIMERA_TLS_CERT": "", "CHIMERA_TLS_KEY": "", "CHIMERA_TLS_CLIENT_CA": ""}
    res = CliRunner().invoke(app, ["serve", "--loop", "asyncio", "--metrics-port", "0", *args],
                             env={**base, **env})
    if res.exception and not isinstance(res.exception, SystemExit):
        raise res.exception
    return res.exit_code, re.sub(r"\s+", " ", res.output), configs


def test_serve_binds_loopback_by_default(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:  # noqa: ANN001
    code, out, configs = _serve(monkeypatch, tmp_path, [])
    assert code == 0, out
    assert configs[-1].host == "127.0.0.1"


def test_serve_refuses_plaintext_tokens_on_the_network_unless_insecure(monkeypatch: pytest.MonkeyPatch,
                                                                      tmp_path) -> None:  # noqa: ANN001
    env = {"CHIMERA_ADMIN_TOKEN": GOOD, "CHIMERA_PREDICT_TOKEN": GOOD2}
    code, out, configs = _serve(monkeypatch, tmp_path, ["--host", "0.0.0.0"], **env)
    assert code == 2 and "refusing to start" in out and "clear text" in out and not configs
    code, out, configs = _serve(monkeypatch, tmp_path, ["--host", "0.0.0.0", "--insecure"], **env)
    assert code == 0 and "--insecure" in out and configs[-1].host == "0.0.0.0"


def test_serve_refuses_a_placeholder_token_even_on_loopback(monkeypatch: pytest.MonkeyPatch,
                                                            tmp_path) -> None:  # noqa: ANN001
    code, out, configs = _serve(monkeypatch, tmp_path, ["--insecure"], CHIMERA_ADMIN_TOKEN="change-me")
    assert code == 2 and "CHIMERA_ADMIN_TOKEN is a placeholder" in out and not configs


def test_serve_refuses_open_outcomes_on_the_network(monkeypatch: pytest.MonkeyPatch,
                                                    tmp_path) -> None:  # noqa: ANN001
    code, out, _ = _serve(monkeypatch, tmp_path, ["--host", "0.0.0.0"])
    assert code == 2 and "outcomes (RecordOutcome*)" in out


def test_serve_warns_about_tokens_in_plaintext_on_loopback(monkeypatch: pytest.MonkeyPatch,
                                                           tmp_path) -> None:  # noqa: ANN001
    code, out, configs = _serve(monkeypatch, tmp_path, [], CHIMERA_OUTCOMES_TOKEN=GOOD3)
    assert code == 0 and "warning" in out and "plaintext" in out
    assert configs[-1].outcomes_token == GOOD3
