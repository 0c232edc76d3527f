"""What Ray Serve says about an application: its details, status, fingerprint and replica counts, and
the error its failing deployment recorded. Read by `replicas.deployment` to decide whether to use,
replace or redeploy an application, and by the gateway's replica pool; none of it changes Serve."""

from __future__ import annotations

import time
from typing import Any

from ray import serve


def app_details(name: str) -> dict[str, Any] | None:
    """Serve's details of one application; None when it (or Serve itself) is not running."""
    from ray.serve.context import _get_global_client

    client = _get_global_client(raise_if_no_controller_running=False)
    if client is None:
        return None
    return client.get_serve_details().get("applications", {}).get(name)


def running_fingerprint(name: str, *, timeout_s: float = 120.0, poll_s: float = 0.25) -> str | None:
    """The fingerprint of the application `name` once it is RUNNING (waiting while it deploys); None
    when there is none, or it failed (`deploy_version` then deletes it and deploys afresh) or is
    unhealthy (deployed again over it)."""
    deadline = time.monotonic() + timeout_s
    while True:
        details = app_details(name)
        if details is None:
            return None
        status = plain(details.get("status")).upper()
        scorer = (details.get("deployments") or {}).get("scorer") or {}
        config = (scorer.get("deployment_config") or {}).get("user_config") or {}
        if status == "RUNNING":
            return str(config.get("fingerprint", "")) or None
        if status != "DEPLOYING" or time.monotonic() > deadline:
            return None
        time.sleep(poll_s)


def app_status(name: str) -> str:
    """The application's status in upper case ("" when Serve does not know it)."""
    details = app_details(name)
    return plain(details.get("status")).upper() if details is not None else ""


def deployment_error(name: str) -> str | None:
    """The last line of the error Serve recorded for the application's failing deployment (a replica's
    constructor raised, e.g. the artifact's sha256 mismatch), or None. Serve's own exception names only
    the deployment; the cause is in the deployment's status message, after a traceback."""
    try:
        app = serve.status().applications.get(name)
    except Exception:  # the status is a nicety on an error path that already has its error
        return None
    for deployment in (app.deployments.values() if app is not None else ()):
        lines = [line.strip() for line in (deployment.message or "").splitlines() if line.strip()]
        if lines:
            return lines[-1][:300]
    return None


def serve_running() -> bool:
    """Whether Ray Serve's controller runs on the cluster (this process then holds a client of it)."""
    from ray.serve.context import _get_global_client

    return _get_global_client(raise_if_no_controller_running=False) is not None


def replica_counts(names: list[str]) -> dict[str, int]:
    """RUNNING replicas of each named application per Serve's status (one controller call); an
    application Serve does not know is left out. Empty when Serve is not running."""
    if not serve_running():
        return {}
    apps = serve.status().applications
    counts: dict[str, int] = {}
    for name in names:
        app = apps.get(name)
        if app is None:
            continue
        states = {plain(k).upper(): n for d in app.deployments.values() for k, n in d.replica_states.items()}
        counts[name] = int(states.get("RUNNING", 0))
    return counts


def plain(value: Any) -> str:
    """An enum member's value (Serve's details hold APIType / ApplicationStatus members) as a str."""
    return str(getattr(value, "value", value) or "")
