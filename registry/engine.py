"""SQLAlchemy engines with a client-side bound on every database call (issue 15: a hung PostgreSQL must
fail calls, not block threads forever), configured by the registry settings (CHIMERA_DB_*).

PostgreSQL: libpq's connect_timeout, TCP keepalives, and server-side statement_timeout, lock_timeout and
idle_in_transaction_session_timeout as connection options; the pool waits at most pool_timeout_s. None
of these helps when the server is *hung* (stopped, swapping, wedged): the kernel still accepts the
connection and acknowledges every byte and keepalive, and the server never times anything out because
it is not running. So the engine's connections also run in psycopg2's "green" mode with a wait
callback (psycopg2.extensions.set_wait_callback) that waits for the server with select() and a
deadline: `query_timeout_s` for a statement's answer, `connect_timeout_s` for the connection handshake
(libpq ignores connect_timeout in this mode, so the callback enforces it). Past the deadline the
call raises OperationalError("could not receive data from server: ...") and psycopg2 marks the
connection broken; SQLAlchemy recognises the message as a disconnect and discards the connection.

The callback is process-wide (psycopg2 has only one): connections made by these engines carry their
engine's deadlines (their connection class), any other psycopg2 connection of the process gets the
environment's CHIMERA_DB_CONNECT_TIMEOUT_S / CHIMERA_DB_QUERY_TIMEOUT_S.
SQLite: the busy timeout (sqlite_busy_timeout_s) bounds waiting for another writer."""

from __future__ import annotations

import select
import time
from typing import Any

from sqlalchemy import Engine, create_engine, event, make_url

from chimera.settings import RegistrySettings


def postgres_connect_args(settings: RegistrySettings,
                          statement_timeout_ms: int | None = None) -> dict[str, Any]:
    """libpq parameters: connect timeout, keepalives and the server-side timeouts as options."""
    args: dict[str, Any] = {
        "connect_timeout": max(1, round(settings.connect_timeout_s)) if settings.connect_timeout_s else 0,
        "keepalives": 1,
        "keepalives_idle": max(1, round(settings.keepalives_idle_s)),
        "keepalives_interval": max(1, round(settings.keepalives_interval_s)),
        "keepalives_count": settings.keepalives_count,
    }
    statement_ms = round(settings.statement_timeout_s * 1000) or (statement_timeout_ms or 0)
    options = {"statement_timeout": statement_ms, "lock_timeout": round(settings.lock_timeout_s * 1000),
               "idle_in_transaction_session_timeout": round(settings.idle_in_transaction_timeout_s * 1000)}
    opts = " ".join(f"-c {k}={int(v)}" for k, v in options.items() if v)
    if opts:
        args["options"] = opts
    return args


def driver_url(url: str) -> str:
    """The registry URL with Chimera's PostgreSQL driver named: `postgresql://...` and `postgres://...`
    become `postgresql+psycopg2://...`. SQLAlchemy 2.1 maps a driverless `postgresql://` to psycopg 3,
    which Chimera does not install (the engine's hung-server deadlines are psycopg2's wait callback),
    and does not know `postgres://` at all; both are what operators and hosted databases commonly
    write. Any other URL (SQLite, an explicit driver) is returned as it is."""
    if not url.startswith(("postgresql://", "postgres://")):
        return url
    return make_url(url).set(drivername="postgresql+psycopg2").render_as_string(hide_password=False)


# The statement timeout of the serving processes (a gateway and its rollout look process): no statement of
# theirs may hold a connection longer than this; batch jobs run without one.
SERVING_STATEMENT_TIMEOUT_MS = 30_000


def make_engine(url: str, *, statement_timeout_ms: int | None = None,
                settings: RegistrySettings | None = None) -> Engine:
    """Engine with the settings both backends need. SQLite gets WAL and a busy timeout so the gateway's
    log writer and the CLI can share the file; PostgreSQL gets pre-ping and every bound described in the
    module docstring. `statement_timeout_ms` is the calling process's default (the gateway: 30 s; batch
    jobs: none); CHIMERA_DB_STATEMENT_TIMEOUT_S, when set, overrides it. `settings` default to the
    environment's registry section."""
    cfg = settings or RegistrySettings.from_env()
    url = driver_url(url)
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": cfg.sqlite_busy_timeout_s,
                                                  "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        return engine
    args = postgres_connect_args(cfg, statement_timeout_ms) if url.startswith("postgres") else {}
    if make_url(url).get_driver_name() == "psycopg2":
        args["connection_factory"] = _deadline_connection_class(cfg.connect_timeout_s, cfg.query_timeout_s)
    return create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=5,
                         pool_timeout=cfg.pool_timeout_s, connect_args=args)


def _deadline_connection_class(connect_timeout_s: float, query_timeout_s: float) -> type:
    """A psycopg2 connection class carrying its deadlines (read by the wait callback)."""
    import psycopg2.extensions as ext

    _install_wait_callback()
    return type("DeadlineConnection", (ext.connection,), {
        "chimera_connect_timeout_s": connect_timeout_s or None,
        "chimera_query_timeout_s": query_timeout_s or None,
    })


_installed = False
_default_timeouts: tuple[float | None, float | None] = (None, None)


def _install_wait_callback() -> None:
    global _installed, _default_timeouts
    if _installed:
        return
    import psycopg2.extensions as ext

    env = RegistrySettings.from_env()
    _default_timeouts = (env.connect_timeout_s or None, env.query_timeout_s or None)
    ext.set_wait_callback(_wait_with_deadline)
    _installed = True


def _wait_with_deadline(conn: Any) -> None:
    """psycopg2 wait callback: like psycopg2.extras.wait_select, with a deadline per call."""
    import psycopg2
    import psycopg2.extensions as ext

    connecting = conn.status == ext.STATUS_SETUP
    # Connections these engines did not make (gateway.serving.split_watch's LISTEN connection) get the
    # environment's bounds: libpq ignores connect_timeout once a wait callback is installed.
    default = _default_timeouts[0] if connecting else _default_timeouts[1]
    timeout = getattr(conn, "chimera_connect_timeout_s" if connecting else "chimera_query_timeout_s", default)
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        state = conn.poll()
        if state == ext.POLL_OK:
            return
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            what = "CHIMERA_DB_CONNECT_TIMEOUT_S" if connecting else "CHIMERA_DB_QUERY_TIMEOUT_S"
            # The wording matches SQLAlchemy's psycopg2 disconnect detection: the connection is dropped.
            raise psycopg2.OperationalError(
                f"could not receive data from server: no answer within {timeout:g} s ({what})")
        if state == ext.POLL_READ:
            select.select([conn.fileno()], [], [], left)
        elif state == ext.POLL_WRITE:
            select.select([], [conn.fileno()], [], left)
        else:
            raise psycopg2.OperationalError(f"bad state from poll: {state}")
