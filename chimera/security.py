"""Start-up refusal rules: what `chimera serve` must refuse before it opens a port.

Pure functions of the configuration (no environment reads, no I/O), so every rule is a unit test and
the CLI stays a thin caller. Why refuse rather than warn: a gateway that starts with a placeholder
token, or that sends tokens in clear text to the network, is reachable by anyone who finds it, and a
warning in a log nobody reads does not close that door.

The rules:
- Tokens (admin, predict, outcomes) must not be placeholders (`change-me`, `secret`, `admin`, ...),
  shorter than MIN_TOKEN_LENGTH, of too few distinct characters, or carry whitespace or bytes a gRPC
  metadata value cannot hold; the admin token must differ from the others (a predict token leaked by a
  client must not be an admin token). No flag turns these off: a weak token is never intended.
- A non-loopback bind in plaintext while tokens are configured sends them in clear text: refused
  unless `insecure=True` (TLS terminated in front, e.g. a service mesh).
- A non-loopback bind with predictions or outcomes open (no token, no client certificate) lets anyone
  who reaches the port score or steer a rollout with outcomes: refused unless `insecure=True`.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass

MIN_TOKEN_LENGTH = 16
MIN_DISTINCT_CHARS = 6
# Compared after lowercasing and dropping everything but letters and digits ("Change_Me" -> "changeme").
PLACEHOLDER_TOKENS = frozenset({
    "changeme", "changemeplease", "changethis", "replaceme", "secret", "mysecret", "supersecret", "admin",
    "administrator", "password", "passw0rd", "token", "admintoken", "predicttoken", "outcomestoken",
    "default", "example", "test", "testing", "dev", "demo", "todo", "fixme", "xxx", "none", "null",
    "letmein", "qwerty", "12345678", "123456789", "1234567890", "1234567890123456", "chimera",
})
# A token containing one of these was copied from an example and never replaced.
PLACEHOLDER_MARKERS = ("changeme", "replaceme", "placeholder", "yourtoken", "example", "insertyour")
INSECURE_HINT = ("set CHIMERA_TLS_CERT and CHIMERA_TLS_KEY (TLS), or bind --host 127.0.0.1, or pass "
                 "--insecure if TLS is terminated in front of the gateway (a service mesh, a TLS proxy on "
                 "the same host)")
TOKEN_HINT = "generate one with `openssl rand -hex 32`"


class StartupRefused(ValueError):
    """The configuration is unsafe to serve with; the message lists every problem and what to do."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("refusing to start:\n  - " + "\n  - ".join(self.problems))


def _normalized(token: str) -> str:
    return re.sub(r"[^a-z0-9]", "", token.lower())


def token_problem(name: str, token: str | None) -> str | None:
    """Why `token` (the value of setting `name`) is unfit to guard anything, or None when it is fit or
    unset (unset means that door has no token; `bind_problems` judges whether that is allowed)."""
    if token is None:
        return None
    if token != token.strip():
        return (f"{name} has leading or trailing whitespace (a newline from a file or a Secret created with "
                "--from-file?): clients would send it without; strip it")
    if not token:
        return f"{name} is empty: unset it or {TOKEN_HINT}"
    if any(not (0x20 <= ord(c) <= 0x7E) for c in token):
        return (f"{name} holds characters a gRPC metadata value cannot carry (printable ASCII only): "
                f"{TOKEN_HINT}")
    norm = _normalized(token)
    if norm in PLACEHOLDER_TOKENS or any(m in norm for m in PLACEHOLDER_MARKERS):
        return f"{name} is a placeholder ({token!r} is the kind of value examples ship with): {TOKEN_HINT}"
    if len(token) < MIN_TOKEN_LENGTH:
        return f"{name} is {len(token)} characters, fewer than {MIN_TOKEN_LENGTH}: {TOKEN_HINT}"
    if len(set(token)) < MIN_DISTINCT_CHARS:
        return f"{name} has fewer than {MIN_DISTINCT_CHARS} distinct characters (guessable): {TOKEN_HINT}"
    return None


def token_problems(tokens: Mapping[str, str | None]) -> list[str]:
    """Every problem of the configured tokens, by setting name (e.g. {"CHIMERA_ADMIN_TOKEN": ...}):
    each token on its own, then the admin token shared with a less privileged door."""
    problems = [p for name, tok in tokens.items() if (p := token_problem(name, tok)) is not None]
    admin = tokens.get("CHIMERA_ADMIN_TOKEN")
    if admin:
        for name, tok in tokens.items():
            if name != "CHIMERA_ADMIN_TOKEN" and tok == admin:
                problems.append(f"{name} equals CHIMERA_ADMIN_TOKEN: whoever holds it could change splits, "
                                "promote and roll back; give each its own token")
    return problems


def is_loopback(host: str) -> bool:
    """Whether binding `host` is reachable from this machine only. "" / 0.0.0.0 / :: (every
    interface) and any name but localhost count as reachable from the network."""
    h = host.strip().strip("[]").lower()
    if h in ("localhost", "ip6-localhost", "ip6-loopback") or h.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class ServeSecurity:
    """What `chimera serve` is about to do, as far as who can reach what is concerned.

    `tls`: a server certificate and key are configured. `client_certs`: mutual TLS (every caller shows
    a certificate signed by the client CA), which authenticates predictions and outcomes too.
    `outcomes_token`: a token RecordOutcome(s) require (None: outcomes are guarded by the predict token
    when `outcomes_use_predict_token`, else open)."""

    host: str
    tls: bool = False
    client_certs: bool = False
    admin_token: str | None = None
    predict_token: str | None = None
    outcomes_token: str | None = None
    outcomes_use_predict_token: bool = True
    insecure: bool = False

    def tokens(self) -> dict[str, str | None]:
        return {"CHIMERA_ADMIN_TOKEN": self.admin_token, "CHIMERA_PREDICT_TOKEN": self.predict_token,
                "CHIMERA_OUTCOMES_TOKEN": self.outcomes_token}

    @property
    def predictions_open(self) -> bool:
        return self.predict_token is None and not self.client_certs

    @property
    def outcomes_open(self) -> bool:
        if self.client_certs or self.outcomes_token is not None:
            return False
        return not (self.outcomes_use_predict_token and self.predict_token is not None)


def bind_problems(s: ServeSecurity) -> list[str]:
    """Problems of binding `s.host` as configured, ignoring `s.insecure` (the caller decides whether the
    flag waives them: `startup_problems` and `check_startup` do)."""
    if is_loopback(s.host):
        return []
    where = f"{s.host or '0.0.0.0'} (reachable from the network)"
    problems = []
    configured = [n for n, t in s.tokens().items() if t is not None]
    if configured and not s.tls:
        problems.append(f"serving on {where} in plaintext would send {', '.join(configured)} in clear text: "
                        f"{INSECURE_HINT}")
    open_doors = [d for d, is_open in (("predictions (Predict*)", s.predictions_open),
                                       ("outcomes (RecordOutcome*)", s.outcomes_open)) if is_open]
    if open_doors:
        problems.append(f"serving on {where} with {' and '.join(open_doors)} open to anyone who reaches the "
                        "port (outcomes steer rollouts): set CHIMERA_PREDICT_TOKEN (and an outcomes token) "
                        "or require client certificates (CHIMERA_TLS_CLIENT_CA), or bind --host 127.0.0.1, "
                        "or pass --insecure if something in front authenticates callers")
    return problems


def startup_problems(s: ServeSecurity) -> tuple[list[str], list[str]]:
    """(refusals, warnings): token problems always refuse; bind problems refuse unless `s.insecure`,
    in which case they come back as warnings to log at start-up."""
    refusals = token_problems(s.tokens())
    bind = bind_problems(s)
    if s.insecure:
        return refusals, [f"--insecure: {p}" for p in bind]
    return refusals + bind, []


def check_startup(s: ServeSecurity) -> list[str]:
    """Raise StartupRefused listing every refusal; return the warnings (bind problems waived by
    `insecure=True`) for the caller to log."""
    refusals, warnings = startup_problems(s)
    if refusals:
        raise StartupRefused(refusals)
    return warnings
