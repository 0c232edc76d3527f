"""deploy/: no Docker engine or Kubernetes cluster runs here, so the files are parsed and checked against the
code they deploy: images, ports (the defaults of `chimera serve`), environment names (read back through
chimera.settings), mounted files, cross-references between services, and the Ray Serve config against
Ray's own schema. The container entrypoint runs for real with stand-ins for `ray` and `chimera`.

Nothing let in (issue 15): no default secret anywhere (compose requires each one, kustomize generates them
from files that are not in git), the Ray dashboard, Ray's client port, Prometheus and Grafana not published
beyond loopback, Ray token authentication decided in the files, a NetworkPolicy evaluated for who may
reach what, the spill directory on a persistent volume, and no database password in Ray actor arguments."""

from __future__ import annotations

import inspect
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
ENV_NAMES = ("CHIMERA_REGISTRY_URL", "CHIMERA_ADMIN_TOKEN", "RAY_ADDRESS")


def serve_defaults() -> dict[str, object]:
    from chimera.cli import serve

    return {k: p.default for k, p in inspect.signature(serve).parameters.items()}


GRPC_PORT = 50051
METRICS_PORT = 9090


def test_cli_serve_defaults_are_what_deploy_assumes() -> None:
    """Ports are the CLI's defaults; the bind address is never left to the default (which may become
    loopback): every container command passes --host 0.0.0.0 itself."""
    d = serve_defaults()
    assert (d["port"], d["metrics_port"]) == (GRPC_PORT, METRICS_PORT) and "host" in d
    cmd = [json.loads(a) for i, a in dockerfile() if i == "CMD"][-1]
    gateways = [cmd, compose()["services"]["gateway"]["command"]]
    gateways += [c["args"] for d in by_kind("StatefulSet") for c in containers(d)]
    for args in gateways:
        assert args[0] == "serve" and option_value(args, "--host") == "0.0.0.0", args


def test_serve_accepts_the_flags_the_deploy_files_pass() -> None:
    """Every `--flag` a deploy file gives `chimera serve` is one of its options (compose states
    --insecure: plaintext gRPC with tokens on the container's address, published on loopback only)."""
    from typing import get_type_hints

    from chimera.cli import serve

    flags = set()
    for name, hint in get_type_hints(serve, include_extras=True).items():
        decls = [d for m in getattr(hint, "__metadata__", ()) for d in getattr(m, "param_decls", None) or ()]
        flags |= {d.split("/")[0] for d in decls if d.startswith("--")} or {"--" + name.replace("_", "-")}
    cmd = [json.loads(a) for i, a in dockerfile() if i == "CMD"][-1]
    gateways = [cmd, compose()["services"]["gateway"]["command"]]
    gateways += [c["args"] for d in by_kind("StatefulSet") for c in containers(d)]
    for args in gateways:
        for flag in (a.split("=")[0] for a in args if a.startswith("--")):
            assert flag in flags, f"chimera serve has no {flag} (a deploy file passes it)"


def test_env_names_are_the_ones_settings_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    from chimera.settings import Settings

    monkeypatch.setenv("CHIMERA_REGISTRY_URL", "postgresql+psycopg2://u:p@db:5432/x")
    monkeypatch.setenv("CHIMERA_ADMIN_TOKEN", "tok")
    monkeypatch.setenv("RAY_ADDRESS", "ray-head:6379")
    s = Settings.from_env()
    assert (s.registry_url, s.admin_token, s.ray_address) == ("postgresql+psycopg2://u:p@db:5432/x", "tok",
                                                              "ray-head:6379")


def option_value(args: list[str], flag: str) -> str:
    for i, a in enumerate(args):
        if a == flag:
            return args[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    raise AssertionError(f"{flag} not in {args}")


# ---------------------------------------------------------------- Dockerfile and entrypoint

def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", (DEPLOY / "Dockerfile").read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_builds_the_gateway_image() -> None:
    instr = dockerfile()
    assert instr[0] == ("FROM", "python:3.11-slim")
    runs = " && ".join(a for i, a in instr if i == "RUN")
    assert "make proto VENV=/usr/local" in runs and "pip install --no-deps ." in runs
    assert runs.index("make proto") < runs.index("pip install --no-deps .")  # stubs go into the package
    expose = {int(p) for i, a in instr if i == "EXPOSE" for p in a.split()}
    assert {GRPC_PORT, METRICS_PORT} <= expose
    entry = [json.loads(a) for i, a in instr if i == "ENTRYPOINT"][-1]
    cmd = [json.loads(a) for i, a in instr if i == "CMD"][-1]
    assert entry == ["chimera-entrypoint"] and cmd[0] == "serve"
    assert int(option_value(cmd, "--port")) == GRPC_PORT
    assert int(option_value(cmd, "--metrics-port")) == METRICS_PORT
    assert "deploy/docker-entrypoint.sh" in runs and (DEPLOY / "docker-entrypoint.sh").is_file()
    volume = [json.loads(a) for i, a in instr if i == "VOLUME"][-1]
    from gateway.server import GatewayConfig

    assert volume == [f"/app/{GatewayConfig.__dataclass_fields__['spill_dir'].default}"]  # the spill dir


def test_dockerfile_dependency_layer_reads_pyproject(tmp_path: Path) -> None:
    """The Dockerfile's dependency layer installs exactly pyproject's [project] dependencies and the `otlp`
    extra (the image can export traces to a collector)."""
    import tomllib

    line = next(a for i, a in dockerfile() if i == "RUN" and "tomllib" in a)
    snippet = re.search(r'python -c "(.*?)"\s*>', line).group(1)
    (tmp_path / "pyproject.toml").write_bytes((ROOT / "pyproject.toml").read_bytes())
    out = subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path, capture_output=True, text=True,
                         check=True).stdout.split()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert out == project["dependencies"] + project["optional-dependencies"]["otlp"]


def test_make_proto_with_the_image_python(tmp_path: Path) -> None:
    """`make proto VENV=/usr/local` after touching the stamp runs only protoc with that Python."""
    venv = tmp_path / "usr-local"
    (venv / "bin").mkdir(parents=True)
    (venv / ".installed").touch()
    # --no-print-directory: under `make test` this is a sub-make, which would print "Entering directory".
    out = subprocess.run(["make", "--no-print-directory", "-n", "proto", f"VENV={venv}"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout.strip().splitlines()
    # One protoc run per proto tree (chimera/v1 and the Open Inference Protocol), nothing else.
    protoc = f"{venv}/bin/python -m grpc_tools.protoc"
    assert len(out) == 2 and all(line.startswith(protoc) for line in out), out
    assert all("--grpc_python_out=." in line and "pip" not in line for line in out)
    assert "protos/chimera/v1/prediction.proto" in out[0]
    assert "protos/inference/grpc_predict_v2.proto" in out[1]


@pytest.fixture
def fake_bin(tmp_path: Path) -> tuple[Path, Path]:
    """Stand-ins for `ray` and `chimera` that log their argv; `ray start` fails FAIL_RAY times."""
    log = tmp_path / "calls.log"
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for name in ("ray", "chimera"):
        script = bindir / name
        script.write_text(f"""#!/bin/sh
echo "{name} $*" >> "{log}"
if [ "{name}" = ray ] && [ -n "${{FAIL_RAY:-}}" ]; then
  n=$(cat "{tmp_path}/fails" 2>/dev/null || echo 0)
  if [ "$n" -lt "$FAIL_RAY" ]; then echo $((n + 1)) > "{tmp_path}/fails"; exit 1; fi
fi
exit 0
""")
        script.chmod(0o755)
    return bindir, log


def run_entrypoint(fake_bin: tuple[Path, Path], *args: str, **env: str) -> tuple[int, list[str], str]:
    bindir, log = fake_bin
    base = {k: v for k, v in os.environ.items() if k not in ENV_NAMES}
    proc = subprocess.run(["sh", str(DEPLOY / "docker-entrypoint.sh"), *args], capture_output=True, text=True,
                          timeout=60, env={**base, "PATH": f"{bindir}:{base['PATH']}", **env})
    calls = log.read_text().splitlines() if log.exists() else []
    return proc.returncode, calls, proc.stderr


def test_entrypoint_serve_joins_the_ray_cluster_first(fake_bin) -> None:
    rc, calls, _ = run_entrypoint(fake_bin, "serve", "--port", "50051", RAY_ADDRESS="ray-head:6379",
                                  CHIMERA_RAY_START_ARGS="--node-ip-address=10.0.0.7")
    assert rc == 0
    assert calls == ["ray start --address=ray-head:6379 --num-cpus=0 --disable-usage-stats "
                     "--node-ip-address=10.0.0.7", "chimera serve --port 50051"]


@pytest.mark.parametrize("address", [None, "ray://ray-head:10001", "auto"])
def test_entrypoint_serve_without_a_cluster_to_join(fake_bin, address: str | None) -> None:
    env = {"RAY_ADDRESS": address} if address else {}
    rc, calls, _ = run_entrypoint(fake_bin, **env)  # no arguments: serve
    assert rc == 0 and calls == ["chimera serve"]


def test_entrypoint_retries_then_gives_up(fake_bin) -> None:
    rc, calls, _ = run_entrypoint(fake_bin, "serve", RAY_ADDRESS="ray-head:6379", FAIL_RAY="1")
    assert rc == 0 and [c.split()[0] for c in calls] == ["ray", "ray", "chimera"]
    bindir, log = fake_bin
    log.unlink()
    (bindir.parent / "fails").unlink()
    rc, calls, err = run_entrypoint(fake_bin, "serve", RAY_ADDRESS="nowhere:6379", FAIL_RAY="99",
                                    CHIMERA_RAY_JOIN_TRIES="1")
    assert rc == 1 and "could not join the Ray cluster at nowhere:6379" in err
    assert not any(c.startswith("chimera") for c in calls)


def test_entrypoint_ray_head_and_cli_commands(fake_bin) -> None:
    rc, calls, _ = run_entrypoint(fake_bin, "ray-head", "--num-cpus=4")
    assert rc == 0 and calls[0].startswith("ray start --head --block --port=6379 ")
    assert "--metrics-export-port=8080" in calls[0] and calls[0].endswith("--num-cpus=4")
    # The dashboard runs jobs for whoever reaches it: the container's loopback unless told otherwise.
    assert "--dashboard-host=127.0.0.1 " in calls[0]
    rc, calls, _ = run_entrypoint(fake_bin, "train", "--model", "m", "--synthetic", "100")
    assert calls[-1] == "chimera train --model m --synthetic 100"


@pytest.fixture
def health_server():
    """Start a grpc.health.v1 server (plaintext, TLS or mutual TLS) on a free loopback port; stopped after."""
    from concurrent import futures

    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    servers = []

    serving = health_pb2.HealthCheckResponse.SERVING

    def start(certs=None, *, mutual: bool = False, status: int = serving) -> str:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        servicer = health.HealthServicer()
        servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        servicer.set("chimera.v1.PredictionService", status)
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        if certs is None:
            port = server.add_insecure_port("127.0.0.1:0")
        else:
            creds = grpc.ssl_server_credentials(
                [(certs.server_key.read_bytes(), certs.server_cert.read_bytes())],
                root_certificates=certs.ca.read_bytes() if mutual else None, require_client_auth=mutual)
            port = server.add_secure_port("127.0.0.1:0", creds)
        server.start()
        servers.append(server)
        return f"127.0.0.1:{port}"

    yield start
    for server in servers:
        server.stop(0)


def probe(target: str, service: str = "chimera.v1.PredictionService", **env: str) -> tuple[int, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("CHIMERA_TLS")}
    base["PATH"] = f"{Path(sys.executable).parent}:{base['PATH']}"  # the probe runs `python`
    proc = subprocess.run(["sh", str(DEPLOY / "docker-entrypoint.sh"), "probe", service, target],
                          capture_output=True, text=True, timeout=60, env={**base, **env})
    return proc.returncode, proc.stdout + proc.stderr


def test_entrypoint_probe_checks_grpc_health_over_tls(health_server, tmp_path: Path) -> None:
    """The Kubernetes probes of deploy/k8s/gateway.yaml (kubelet's own gRPC probe has no TLS): SERVING is
    exit 0; NOT_SERVING, an untrusted certificate or a missing client certificate is exit 1."""
    from grpc_health.v1 import health_pb2

    from tests.certs import make_certs

    certs = make_certs(tmp_path / "certs")
    plain = health_server()
    assert probe(plain)[0] == 0 and probe(plain, "")[0] == 0
    rc, out = probe(health_server(status=health_pb2.HealthCheckResponse.NOT_SERVING))
    assert rc == 1 and "NOT_SERVING" in out
    tls = health_server(certs)
    server_env = {"CHIMERA_TLS_CERT": str(certs.server_cert), "CHIMERA_TLS_SERVER_NAME": "localhost"}
    rc, out = probe(tls, **server_env, CHIMERA_TLS_CA=str(certs.ca))
    assert rc == 0 and out.strip().endswith(": SERVING"), out
    assert probe(tls, **server_env, CHIMERA_TLS_CA=str(certs.other_ca))[0] == 1
    assert probe(tls)[0] == 1  # plaintext against TLS
    mutual = health_server(certs, mutual=True)
    assert probe(mutual, **server_env, CHIMERA_TLS_CA=str(certs.ca))[0] == 1
    client = {"CHIMERA_TLS_CLIENT_CERT": str(certs.client_cert),
              "CHIMERA_TLS_CLIENT_KEY": str(certs.client_key)}
    assert probe(mutual, **server_env, CHIMERA_TLS_CA=str(certs.ca), **client)[0] == 0


# ---------------------------------------------------------------- docker-compose

def compose() -> dict:
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())


COMPOSE_SECRETS = ("POSTGRES_PASSWORD", "CHIMERA_ADMIN_TOKEN", "CHIMERA_PREDICT_TOKEN", "RAY_AUTH_TOKEN",
                   "GRAFANA_ADMIN_PASSWORD")
# What an operator puts in deploy/.env (hex: the Postgres password goes into a URL unescaped).
COMPOSE_ENV = {name: f"{i}f3a9c07d1e2b4a6{i}8c5d0e7f9a1b3c{i}" for i, name in enumerate(COMPOSE_SECRETS)}
VAR_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(:[-?])?([^}]*)\}")


def interpolate(value: str, env: dict[str, str] | None = None) -> str:
    """Compose's ${VAR:-default} and ${VAR:?message}: the variable's value when set (COMPOSE_ENV by
    default), else the default; an unset required variable raises, as `docker compose up` refuses."""
    env = COMPOSE_ENV if env is None else env

    def sub(m: re.Match) -> str:
        name, op, arg = m.groups()
        if env.get(name):
            return env[name]
        if op == ":?":
            raise KeyError(f"{name}: {arg}")
        return arg

    return VAR_REF.sub(sub, value)


def strings(node: object) -> list[str]:
    if isinstance(node, dict):
        return [s for k, v in node.items() for s in strings(k) + strings(v)]
    if isinstance(node, list):
        return [s for v in node for s in strings(v)]
    return [node] if isinstance(node, str) else []


def host_path(spec: str) -> tuple[Path, str]:
    src, dst = spec.split(":")[:2]
    return (DEPLOY / src).resolve(), dst


def test_compose_services_and_images() -> None:
    services = compose()["services"]
    assert set(services) == {"postgres", "ray-head", "gateway", "scheduler", "prometheus", "grafana"}
    for name, svc in services.items():
        assert svc.get("image"), f"{name} has no image"
    for name in ("gateway", "ray-head", "scheduler"):  # one image: Ray, Python and replica code must match
        svc = services[name]
        assert svc["image"] == "chimera:latest"
        dockerfile_path = DEPLOY / svc["build"]["context"] / svc["build"]["dockerfile"]
        assert dockerfile_path.resolve() == DEPLOY / "Dockerfile"
    assert services["prometheus"]["image"].startswith("prom/prometheus:")
    assert services["grafana"]["image"].startswith("grafana/grafana:")
    assert services["postgres"]["image"].startswith("postgres:")


def test_compose_gateway_ports_and_env_match_the_code() -> None:
    from sqlalchemy.engine import make_url

    services = compose()["services"]
    gw = services["gateway"]
    assert gw["command"][0] == "serve"
    assert int(option_value(gw["command"], "--port")) == GRPC_PORT
    assert int(option_value(gw["command"], "--metrics-port")) == METRICS_PORT
    assert gw["ports"] == [f"127.0.0.1:{GRPC_PORT}:{GRPC_PORT}"]  # this host only
    env = gw["environment"]
    assert set(ENV_NAMES) <= set(env)
    url = make_url(interpolate(env["CHIMERA_REGISTRY_URL"]))
    pg = services["postgres"]["environment"]
    assert (url.drivername, url.host, url.database, url.username) == (
        "postgresql+psycopg2", "postgres", pg["POSTGRES_DB"], pg["POSTGRES_USER"])
    assert url.password == interpolate(pg["POSTGRES_PASSWORD"]) == COMPOSE_ENV["POSTGRES_PASSWORD"]
    host, port = env["RAY_ADDRESS"].split(":")
    assert host in services and services[host]["command"][0] == "ray-head" and port == "6379"
    assert services["ray-head"]["environment"]["CHIMERA_REGISTRY_URL"] == env["CHIMERA_REGISTRY_URL"]
    assert set(gw["depends_on"]) == {"postgres", "ray-head"}
    from gateway.server import GatewayConfig

    spill = [dst for spec in gw["volumes"] for _, dst in [spec.split(":")[:2]]]
    assert f"/app/{GatewayConfig.__dataclass_fields__['spill_dir'].default}" in spill


def test_compose_prometheus_scrapes_the_gateway_metrics_port() -> None:
    services = compose()["services"]
    prom = services["prometheus"]
    mounts = dict(host_path(v)[::-1] for v in prom["volumes"] if v.startswith("./"))
    config_path = option_value(prom["command"], "--config.file")
    config_file = mounts[config_path]
    assert config_file == DEPLOY / "prometheus" / "prometheus.yml" and config_file.is_file()
    config = yaml.safe_load(config_file.read_text())
    # Rule files resolve relative to the config file, inside the container too.
    for rule in config["rule_files"]:
        in_container = str(Path(config_path).parent / rule)
        assert in_container in mounts and mounts[in_container].is_file(), rule
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    targets = [t for sc in jobs["chimera-gateway"]["static_configs"] for t in sc["targets"]]
    gw_metrics = option_value(services["gateway"]["command"], "--metrics-port")
    assert targets == [f"gateway:{gw_metrics}"]
    assert str(gw_metrics) in [str(p) for p in services["gateway"]["expose"]]
    ray_targets = [t for sc in jobs["ray"]["static_configs"] for t in sc["targets"]]
    assert ray_targets == ["ray-head:8080"] and "8080" in services["ray-head"]["expose"]


def test_compose_scheduler_exports_drift_and_is_scraped() -> None:
    """`chimera scheduler` computes the drift gauges the dashboard's Drift row and the drift alerts read: it
    runs long (not --once) with the gateway's registry and token, drift on, and Prometheus scrapes its metrics
    port (the CLI's default) as job chimera-scheduler."""
    from chimera.cli import scheduler

    default_port = inspect.signature(scheduler).parameters["metrics_port"].default
    services = compose()["services"]
    sched, gw = services["scheduler"], services["gateway"]
    assert sched["command"][0] == "scheduler" and "--once" not in sched["command"]
    port = int(option_value(sched["command"], "--metrics-port"))
    assert port == default_port and port != 0
    assert str(port) in [str(p) for p in sched["expose"]]
    assert f"127.0.0.1:{port}/metrics" in " ".join(sched["healthcheck"]["test"])
    env = sched["environment"]
    for name in ("CHIMERA_REGISTRY_URL", "CHIMERA_ADMIN_TOKEN"):
        assert env[name] == gw["environment"][name], name
    assert env.get("CHIMERA_DRIFT_SCHEDULE", "") != "off"
    # After the gateway is healthy: the gateway runs the registry's migrations first.
    assert sched["depends_on"]["gateway"]["condition"] == "service_healthy"
    assert "scheduler" in services["prometheus"]["depends_on"]
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    targets = [t for sc in jobs["chimera-scheduler"]["static_configs"] for t in sc["targets"]]
    assert targets == [f"scheduler:{port}"]


def test_compose_grafana_mounts_the_dashboard_and_provisioning() -> None:
    grafana = compose()["services"]["grafana"]
    mounts = dict(host_path(v)[::-1] for v in grafana["volumes"] if v.startswith("./"))
    for dst, src in mounts.items():
        assert src.exists(), f"{src} (mounted at {dst}) does not exist"
    dash_dir = next(dst for dst, src in mounts.items() if src == DEPLOY / "grafana" / "dashboards")
    assert (DEPLOY / "grafana" / "dashboards" / "chimera.json").is_file()
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{dash_dir}/chimera.json"
    provider_file = mounts["/etc/grafana/provisioning/dashboards"] / "chimera.yml"
    providers = yaml.safe_load(provider_file.read_text())["providers"]
    assert [p["options"]["path"] for p in providers] == [dash_dir]
    ds_file = mounts["/etc/grafana/provisioning/datasources"] / "prometheus.yml"
    (ds,) = yaml.safe_load(ds_file.read_text())["datasources"]
    assert ds["type"] == "prometheus"
    url = urlsplit(ds["url"])
    assert url.hostname == "prometheus" and url.port == 9090
    assert "127.0.0.1:9090:9090" in compose()["services"]["prometheus"]["ports"]
    dash = json.loads((DEPLOY / "grafana" / "dashboards" / "chimera.json").read_text())
    assert any(v["type"] == "datasource" and v["query"] == "prometheus" for v in dash["templating"]["list"])


def test_compose_has_no_default_secret() -> None:
    """Every secret is a required variable (${VAR:?...}): with none set, `docker compose up` refuses to
    start, naming the variable and how to make one; deploy/.env.example lists exactly these, empty, and
    neither git nor the image build picks up a real deploy/.env."""
    text = (DEPLOY / "docker-compose.yml").read_text()
    refs = VAR_REF.findall(text)
    required = {name for name, op, _ in refs if op == ":?"}
    assert required == set(COMPOSE_SECRETS)
    for name, op, default in refs:
        if re.search(r"PASSWORD|TOKEN|SECRET|KEY", name):
            assert op == ":?", f"${{{name}}} has a default ({op}{default})"
    env_refs = [s for s in strings(compose()) if "${" in s]
    for name in COMPOSE_SECRETS:
        with pytest.raises(KeyError, match=name):
            for value in env_refs:
                interpolate(value, {k: v for k, v in COMPOSE_ENV.items() if k != name})
    for value in env_refs:
        interpolate(value)  # everything set: nothing missing
    example = dict(line.split("=", 1) for line in (DEPLOY / ".env.example").read_text().splitlines()
                   if line and not line.startswith("#"))
    assert example == {name: "" for name in COMPOSE_SECRETS}
    assert ".env" in (DEPLOY / ".gitignore").read_text().split()
    assert "**/.env" in (DEPLOY / "Dockerfile.dockerignore").read_text().split()


def test_compose_publishes_only_on_loopback() -> None:
    """gRPC, Prometheus and Grafana on the host's loopback only; nothing of Ray (its dashboard runs jobs
    for whoever reaches it; the entrypoint keeps it on the container's loopback); Grafana wants a login."""
    services = compose()["services"]
    published = {}
    for name, svc in services.items():
        for spec in svc.get("ports", []):
            assert isinstance(spec, str) and spec.startswith("127.0.0.1:"), (name, spec)
            published[name] = int(spec.split(":")[1])
    assert published == {"gateway": GRPC_PORT, "prometheus": 9090, "grafana": 3000}
    assert "ports" not in services["ray-head"] and "ports" not in services["postgres"]
    grafana = services["grafana"]["environment"]
    assert grafana["GF_AUTH_ANONYMOUS_ENABLED"] == "false"
    assert grafana["GF_SECURITY_ADMIN_PASSWORD"].startswith("${GRAFANA_ADMIN_PASSWORD:?")


def test_compose_ray_auth_is_decided_and_secrets_go_only_where_needed() -> None:
    """RAY_AUTH_MODE=token with one token on every Ray node and driver (the head and the gateway, which
    joins as a node): a node whose mode differs cannot join. The Ray head holds no gateway token."""
    services = compose()["services"]
    head, gw = services["ray-head"]["environment"], services["gateway"]["environment"]
    for env in (head, gw):
        assert env["RAY_AUTH_MODE"] == "token"
        assert interpolate(env["RAY_AUTH_TOKEN"]) == COMPOSE_ENV["RAY_AUTH_TOKEN"]
    assert head["RAY_AUTH_TOKEN"] == gw["RAY_AUTH_TOKEN"]
    assert not {"CHIMERA_ADMIN_TOKEN", "CHIMERA_PREDICT_TOKEN"} & set(head)
    assert head["CHIMERA_REGISTRY_URL"] == gw["CHIMERA_REGISTRY_URL"]  # the replicas read it there
    # The gateway states plaintext explicitly (published on loopback only), as chimera serve requires.
    assert "--insecure" in services["gateway"]["command"]


def deploy_text_files() -> list[Path]:
    return [f for f in DEPLOY.rglob("*") if f.is_file() and f.suffix not in (".png",)]


def test_no_placeholder_secret_in_any_deploy_file() -> None:
    """No change-me, no admin/admin, no Secret object with a value: the values come from the operator."""
    for f in deploy_text_files():
        text = f.read_text()
        for bad in ("change-me", "changeme", "admin/admin"):
            assert bad not in text.lower().replace("change_me", "changeme"), f"{f}: {bad}"
    assert not by_kind("Secret"), "secrets are generated from files that are not in git"


# ---------------------------------------------------------------- Ray Serve config

def serve_config() -> dict:
    return yaml.safe_load((DEPLOY / "ray" / "serve-config.yaml").read_text())


def test_serve_config_is_valid_for_ray_serve() -> None:
    from ray.serve.schema import ServeDeploySchema

    from replicas.deployment import VersionReplica, app_name

    schema = ServeDeploySchema.model_validate(serve_config())
    assert schema.applications
    for app in schema.applications:
        assert app.name == app_name(app.args["model"], int(app.args["version"]))
        assert app.route_prefix is None  # replicas are reached through Ray handles only
        assert [d.name for d in app.deployments] == [VersionReplica.name]


def test_serve_config_keeps_the_replica_environment() -> None:
    """A config's ray_actor_options replace the code's whole (Ray Serve does not merge them), so the
    replica's environment (run user code on the replica's own loop) must be restated there."""
    from replicas.deployment import REPLICA_ENV

    for app in serve_config()["applications"]:
        for d in app["deployments"]:
            if "ray_actor_options" in d:
                env = d["ray_actor_options"].get("runtime_env", {}).get("env_vars", {})
                assert env.items() >= REPLICA_ENV.items(), (app["name"], env)


def test_serve_config_import_path_builds_an_application(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    from ray.serve import Application

    monkeypatch.setenv("CHIMERA_REGISTRY_URL", "postgresql+psycopg2://u:p@db:5432/x")
    for app in serve_config()["applications"]:
        module, _, attr = app["import_path"].partition(":")
        builder = getattr(importlib.import_module(module), attr)
        built = builder(app["args"])
        assert isinstance(built, Application)
        # The replica gets the pod's registry URL, without its password (Ray shows actor arguments on
        # its dashboard and state API), and the version the config names.
        args = built._bound_deployment.init_args
        assert args[:3] == ("postgresql+psycopg2://u:***@db:5432/x", app["args"]["model"],
                            int(app["args"]["version"]))
        assert not any(":p@" in str(a) for a in args)


def test_replica_reads_the_registry_password_from_its_node_environment() -> None:
    """The password never travels as a Ray actor argument; a replica takes the full URL from its Ray
    node's CHIMERA_REGISTRY_URL when that names the same database, and says what to set otherwise."""
    from replicas.deployment import actor_registry_url, replica_registry_url, version_app

    full = "postgresql+psycopg2://chimera:s3cr%40t@db:5432/chimera"
    given = actor_registry_url(full)
    assert given == "postgresql+psycopg2://chimera:***@db:5432/chimera"
    assert version_app(full, "m", 1)._bound_deployment.init_args[0] == given
    assert replica_registry_url(given, {"CHIMERA_REGISTRY_URL": full}) == full
    for env, why in (({}, "is unset"),
                     ({"CHIMERA_REGISTRY_URL": full.replace("@db:", "@other:")}, "names another database")):
        with pytest.raises(RuntimeError, match=why) as err:
            replica_registry_url(given, env)
        assert "set CHIMERA_REGISTRY_URL" in str(err.value) and "s3cr" not in str(err.value)
    for url in ("sqlite:////data/chimera.db", "postgresql+psycopg2://chimera@db:5432/chimera"):
        assert actor_registry_url(url) == url and replica_registry_url(url, {}) == url  # no password


def test_build_app_args_and_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    from replicas.deployment import build_app

    monkeypatch.delenv("CHIMERA_REGISTRY_URL", raising=False)
    monkeypatch.delenv("CHIMERA_TRACES_EXPORTER", raising=False)
    with pytest.raises(ValueError, match="no registry URL: set CHIMERA_REGISTRY_URL"):
        build_app({"model": "m", "version": 1})  # never a silent local SQLite file on a Ray pod
    with pytest.raises(ValueError, match="version required"):
        build_app({"model": "m", "registry_url": "sqlite:////x.db"})
    with pytest.raises(ValueError, match="must be an integer"):
        build_app({"model": "m", "version": "one", "registry_url": "sqlite:////x.db"})
    with pytest.raises(ValueError, match="jaeger"):
        build_app({"model": "m", "version": 1, "registry_url": "sqlite:////x.db",
                   "traces_exporter": "jaeger"})
    app = build_app({"model": "m", "version": "2", "registry_url": "sqlite:////x.db", "num_cpus": 0.5,
                     "traces_exporter": "memory"})
    deployment = app._bound_deployment
    assert deployment.init_args == ("sqlite:////x.db", "m", 2, "memory")
    assert deployment.ray_actor_options["num_cpus"] == 0.5
    monkeypatch.setenv("CHIMERA_REGISTRY_URL", "postgresql+psycopg2://u:p@db:5432/x")
    monkeypatch.setenv("CHIMERA_TRACES_EXPORTER", "console")
    assert build_app({"model": "m", "version": 1})._bound_deployment.init_args == (
        "postgresql+psycopg2://u:***@db:5432/x", "m", 1, "console")


# ---------------------------------------------------------------- Kubernetes

def k8s_docs() -> list[dict]:
    docs = []
    for f in sorted((DEPLOY / "k8s").glob("*.yaml")):
        if f.name != "kustomization.yaml":
            docs += [d for d in yaml.safe_load_all(f.read_text()) if d]
    return docs


def by_kind(kind: str) -> list[dict]:
    return [d for d in k8s_docs() if d["kind"] == kind]


def containers(doc: dict) -> list[dict]:
    if doc["kind"] == "RayService":
        rc = doc["spec"]["rayClusterConfig"]
        specs = [rc["headGroupSpec"]["template"]["spec"]]
        specs += [g["template"]["spec"] for g in rc["workerGroupSpecs"]]
        return [c for s in specs for c in s["containers"]]
    return doc["spec"]["template"]["spec"]["containers"]


def all_containers(node: object) -> list[dict]:
    """Every container of any workload kind (Deployment, RayService, CronJob, ...)."""
    if isinstance(node, dict):
        found = [c for c in node.get("containers", []) if isinstance(c, dict)]
        return found + [c for k, v in node.items() if k != "containers" for c in all_containers(v)]
    if isinstance(node, list):
        return [c for v in node for c in all_containers(v)]
    return []


def test_k8s_manifests_have_the_required_kinds() -> None:
    from collections import Counter

    kinds = Counter(d["kind"] for d in k8s_docs())
    required = Counter(["Namespace", "RayService", "StatefulSet", "Service", "Service", "NetworkPolicy",
                        "ServiceMonitor", "PodMonitor", "PrometheusRule"])
    assert not required - kinds, f"missing: {required - kinds}"
    for d in k8s_docs():
        assert d["apiVersion"] and d["metadata"]["name"]
        if d["kind"] != "Namespace":
            assert d["metadata"]["namespace"] == "chimera"
    kust = yaml.safe_load((DEPLOY / "k8s" / "kustomization.yaml").read_text())
    assert sorted(kust["resources"]) == sorted(f.name for f in (DEPLOY / "k8s").glob("*.yaml")
                                               if f.name != "kustomization.yaml")
    assert [i["name"] for i in kust["images"]] == ["chimera"]


def test_k8s_every_container_uses_the_chimera_image_and_existing_secrets() -> None:
    keys = secret_keys()
    docs = [d for d in k8s_docs() if d["kind"] not in ("Secret", "PrometheusRule")]
    found = [c for d in docs for c in all_containers(d.get("spec", {}))]
    assert len(found) >= 4  # gateway, ray head, ray worker, ...
    for c in found:
        assert c["image"].split(":")[0] == "chimera", c["name"]
        for e in c.get("env", []):
            ref = e.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                assert ref["key"] in keys.get(ref["name"], set()), (c["name"], ref)


def test_k8s_rayservice() -> None:
    from packaging.version import Version

    (rs,) = by_kind("RayService")
    assert rs["apiVersion"] == "ray.io/v1"
    assert yaml.safe_load(rs["spec"]["serveConfigV2"]) == serve_config()
    rc = rs["spec"]["rayClusterConfig"]
    assert Version(rc["rayVersion"]) >= Version("2.52")  # token authentication
    # Ray token auth decided here: KubeRay puts RAY_AUTH_MODE/RAY_AUTH_TOKEN on every Ray container from
    # the Secret the gateways read too, and uses it for its own dashboard calls.
    assert rc["authOptions"] == {"mode": "token", "secretName": "chimera-ray-auth"}
    assert "auth_token" in secret_keys()["chimera-ray-auth"]
    # The operator deploys serveConfigV2 through the dashboard: it listens on the pod network, and the
    # NetworkPolicy (test_k8s_network_policy) lets only the operator reach it.
    assert rc["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    # The production version autoscales (issue 16); a valid Ray Serve autoscaling config.
    from ray.serve.config import AutoscalingConfig

    scorer = serve_config()["applications"][0]["deployments"][0]
    auto = AutoscalingConfig(**scorer["autoscaling_config"])
    assert "num_replicas" not in scorer and 1 <= auto.min_replicas < auto.max_replicas
    assert rc["workerGroupSpecs"] and all(g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
                                          for g in rc["workerGroupSpecs"])
    head = rc["headGroupSpec"]["template"]["spec"]["containers"][0]
    head_ports = {p["name"]: p["containerPort"] for p in head["ports"]}
    assert {"gcs-server": 6379, "dashboard": 8265}.items() <= head_ports.items()
    assert 10001 not in head_ports.values()  # the Ray client port: not on KubeRay's head Service
    for c in containers(rs):
        assert c["image"].split(":")[0] == "chimera"  # the gateway's image (kustomize sets the registry)
        env = {e["name"]: e for e in c["env"]}
        # The replicas read the registry URL (with its password) here, never from actor arguments.
        assert env["CHIMERA_REGISTRY_URL"]["valueFrom"]["secretKeyRef"] == {"name": "chimera-registry",
                                                                            "key": "url"}
        assert not {"CHIMERA_ADMIN_TOKEN", "CHIMERA_PREDICT_TOKEN", "RAY_AUTH_MODE"} & set(env)


def kustomization() -> dict:
    return yaml.safe_load((DEPLOY / "k8s" / "kustomization.yaml").read_text())


def secret_keys() -> dict[str, set[str]]:
    """The Secrets kustomize generates and their keys: from each env file's committed .example (the real
    file is not in git), or from the files' key=path pairs."""
    out: dict[str, set[str]] = {}
    for gen in kustomization()["secretGenerator"]:
        keys = {spec.split("=", 1)[0] for spec in gen.get("files", [])}
        for env in gen.get("envs", []):
            example = DEPLOY / "k8s" / f"{env}.example"
            keys |= {line.split("=", 1)[0] for line in example.read_text().splitlines()
                     if line and not line.startswith("#")}
        out[gen["name"]] = keys
    return out


def test_k8s_secrets_are_generated_from_files_outside_git() -> None:
    """No default secret: kustomize builds each Secret from a file the operator creates (and git ignores);
    the committed examples hold keys without values; fixed names, since the RayService refers to one by
    name in a field kustomize does not rewrite."""
    kust = kustomization()
    assert kust["generatorOptions"]["disableNameSuffixHash"] is True
    assert set(secret_keys()) == {"chimera-registry", "chimera-admin", "chimera-predict", "chimera-ray-auth",
                                  "chimera-gateway-tls"}
    ignored = (DEPLOY / ".gitignore").read_text().split()
    for gen in kust["secretGenerator"]:
        for env in gen.get("envs", []):
            assert "k8s/secrets/*.env" in ignored and env.startswith("secrets/") and env.endswith(".env")
            example = (DEPLOY / "k8s" / f"{env}.example").read_text().splitlines()
            assert example and all(line.endswith("=") for line in example), f"{env}.example holds a value"
        for spec in gen.get("files", []):
            path = spec.split("=", 1)[1]
            assert path.startswith("secrets/") and f"k8s/secrets/*{Path(path).suffix}" in ignored
    (tls,) = [g for g in kust["secretGenerator"] if g["name"] == "chimera-gateway-tls"]
    assert tls["type"] == "kubernetes.io/tls"


def test_k8s_gateway_statefulset() -> None:
    from chimera.v1 import prediction_pb2
    from gateway.server import GatewayConfig

    (sts,) = by_kind("StatefulSet")
    (rs,) = by_kind("RayService")
    tmpl = sts["spec"]["template"]
    assert sts["spec"]["selector"]["matchLabels"].items() <= tmpl["metadata"]["labels"].items()
    assert sts["spec"]["serviceName"] == "chimera-gateway-headless"
    (c,) = containers(sts)
    assert c["image"].split(":")[0] == "chimera"
    assert c["args"][0] == "serve"
    assert int(option_value(c["args"], "--port")) == GRPC_PORT
    assert int(option_value(c["args"], "--metrics-port")) == METRICS_PORT
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"grpc": GRPC_PORT, "metrics": METRICS_PORT}
    env = {e["name"]: e for e in c["env"]}
    assert set(ENV_NAMES) <= set(env)
    keys = secret_keys()
    for name in ("CHIMERA_REGISTRY_URL", "CHIMERA_ADMIN_TOKEN", "CHIMERA_PREDICT_TOKEN", "RAY_AUTH_TOKEN"):
        ref = env[name]["valueFrom"]["secretKeyRef"]  # from Secrets only, never a value in the manifest
        assert ref["key"] in keys[ref["name"]], ref
    assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == rs["spec"]["rayClusterConfig"][
        "authOptions"]["secretName"]
    assert env["RAY_AUTH_MODE"]["value"] == "token"  # decided, like the RayService's authOptions
    # Versions the gateway deploys itself autoscale; the settings parse (chimera.settings.ReplicaScaling).
    from chimera.settings import ReplicaScaling

    names = ("CHIMERA_REPLICAS_MIN", "CHIMERA_REPLICAS_MAX")
    scaling = ReplicaScaling.from_env({k: env[k]["value"] for k in names})
    assert scaling.autoscaled
    host, port = env["RAY_ADDRESS"]["value"].split(":")
    assert host == f"{rs['metadata']['name']}-head-svc" and int(port) == 6379  # KubeRay's head Service
    # TLS from the chimera-gateway-tls Secret, so no --insecure: chimera serve refuses plaintext + tokens.
    assert "--insecure" not in c["args"]
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    vols = {v["name"]: v for v in tmpl["spec"]["volumes"]}
    tls_dir = mounts["tls"]["mountPath"]
    assert vols["tls"]["secret"]["secretName"] == "chimera-gateway-tls" and mounts["tls"]["readOnly"]
    for var, key in (("CHIMERA_TLS_CERT", "tls.crt"), ("CHIMERA_TLS_KEY", "tls.key"),
                     ("CHIMERA_TLS_CA", "ca.crt")):
        assert env[var]["value"] == f"{tls_dir}/{key}" and key in keys["chimera-gateway-tls"]
    # Probes: the entrypoint's TLS health check (kubelet's gRPC probe has no TLS).
    service_name = prediction_pb2.DESCRIPTOR.services_by_name["PredictionService"].full_name
    for probe_name in ("startupProbe", "readinessProbe"):
        assert c[probe_name]["exec"]["command"] == ["chimera-entrypoint", "probe", service_name,
                                                    f"127.0.0.1:{GRPC_PORT}"]
    assert c["livenessProbe"]["exec"]["command"][:2] == ["chimera-entrypoint", "probe"]
    grace = float(option_value(c["args"], "--grace"))
    assert tmpl["spec"]["terminationGracePeriodSeconds"] > grace + 5  # drain + log flush fit in
    ann = tmpl["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true" and int(ann["prometheus.io/port"]) == METRICS_PORT
    # The spill directory on a PersistentVolumeClaim per pod: spilled rows survive losing the pod.
    spill_dir = f"/app/{GatewayConfig.__dataclass_fields__['spill_dir'].default}"
    (spill,) = [m for m in c["volumeMounts"] if m["mountPath"] == spill_dir]
    assert spill["name"] not in vols, "the spill directory must not be an emptyDir or any pod volume"
    (claim,) = [t for t in sts["spec"]["volumeClaimTemplates"] if t["metadata"]["name"] == spill["name"]]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert claim["spec"]["resources"]["requests"]["storage"]
    assert sts["spec"]["persistentVolumeClaimRetentionPolicy"]["whenScaled"] == "Retain"
    assert tmpl["spec"]["securityContext"]["fsGroup"] == tmpl["spec"]["securityContext"]["runAsUser"] == 1000
    assert not any("emptyDir" in v for n, v in vols.items() if n != "shm")


def test_k8s_services_and_monitoring() -> None:
    (dep,) = by_kind("StatefulSet")
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    (c,) = containers(dep)
    container_ports = {p["name"] for p in c["ports"]}
    services = {s["metadata"]["name"]: s for s in by_kind("Service")}
    assert set(services) == {"chimera-gateway", "chimera-gateway-headless"}
    for svc in services.values():
        assert svc["spec"]["selector"].items() <= pod_labels.items()
        for p in svc["spec"]["ports"]:
            assert p["targetPort"] in container_ports
    main = services["chimera-gateway"]
    main_ports = {p["name"]: p["port"] for p in main["spec"]["ports"]}
    assert main_ports == {"grpc": GRPC_PORT, "metrics": METRICS_PORT}
    assert services["chimera-gateway-headless"]["spec"]["clusterIP"] == "None"

    (sm,) = by_kind("ServiceMonitor")
    # The ServiceMonitor picks the main Service only (job label = Service name = what the rules select).
    matched = [n for n, s in services.items()
               if sm["spec"]["selector"]["matchLabels"].items() <= s["metadata"]["labels"].items()]
    assert matched == ["chimera-gateway"]
    assert [e["port"] for e in sm["spec"]["endpoints"]] == ["metrics"]
    (rule,) = by_kind("PrometheusRule")
    alerts = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    assert rule["spec"]["groups"] == alerts["groups"], "deploy/k8s/monitoring.yaml is out of date"
    (pm,) = by_kind("PodMonitor")
    (rs,) = by_kind("RayService")
    rc = rs["spec"]["rayClusterConfig"]
    components = {rc["headGroupSpec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"]}
    components |= {g["template"]["metadata"]["labels"]["app.kubernetes.io/component"]
                   for g in rc["workerGroupSpecs"]}
    (expr,) = pm["spec"]["selector"]["matchExpressions"]
    assert set(expr["values"]) == components
    assert rc["headGroupSpec"]["rayStartParams"]["metrics-export-port"] == "8080"


# ---------------------------------------------------------------- NetworkPolicy, evaluated

def _selects(selector: dict | None, labels: dict[str, str]) -> bool:
    """A Kubernetes label selector (matchLabels, matchExpressions with In/NotIn/Exists) against labels."""
    if selector is None:
        return False
    if not set(selector) <= {"matchLabels", "matchExpressions"}:
        raise AssertionError(f"selector this test cannot evaluate: {selector}")
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for e in selector.get("matchExpressions", []):
        op, key, values = e["operator"], e["key"], set(e.get("values", []))
        ok = {"In": labels.get(key) in values, "NotIn": labels.get(key) not in values,
              "Exists": key in labels, "DoesNotExist": key not in labels}[op]
        if not ok:
            return False
    return True


def pod_labels() -> dict[str, tuple[dict[str, str], list[dict]]]:
    """Each chimera pod kind: (its labels, its container ports) as the manifests create them."""
    (sts,) = by_kind("StatefulSet")
    (rs,) = by_kind("RayService")
    (cron,) = by_kind("CronJob")
    rc = rs["spec"]["rayClusterConfig"]
    head, worker = rc["headGroupSpec"]["template"], rc["workerGroupSpecs"][0]["template"]
    job = cron["spec"]["jobTemplate"]["spec"]["template"]

    def ports(t: dict) -> list[dict]:
        return [p for c in t["spec"]["containers"] for p in c.get("ports", [])]

    return {"gateway": (sts["spec"]["template"]["metadata"]["labels"], ports(sts["spec"]["template"])),
            "ray-head": (head["metadata"]["labels"], ports(head)),
            "ray-worker": (worker["metadata"]["labels"], ports(worker)),
            "retrain": (job["metadata"]["labels"], ports(job)),
            "registry-db": ({"app.kubernetes.io/component": "registry-db"},
                            [{"name": "postgres", "containerPort": 5432}])}


NS = "chimera"


def allowed(src: dict[str, str], src_ns: dict[str, str], dst: str, port: int) -> bool:
    """Whether the NetworkPolicies of deploy/k8s let a pod with labels `src` in a namespace with labels
    `src_ns` open a TCP connection to pod kind `dst` on `port` (ingress rules; no policy: allowed)."""
    labels, container_ports = pod_labels()[dst]
    named = {p["name"]: p["containerPort"] for p in container_ports}
    policies = [p for p in by_kind("NetworkPolicy") if _selects(p["spec"]["podSelector"], labels)
                or p["spec"]["podSelector"] == {}]
    policies = [p for p in policies if "Ingress" in p["spec"]["policyTypes"]]
    if not policies:
        return True
    same_ns = src_ns.get("kubernetes.io/metadata.name") == NS
    for pol in policies:
        for rule in pol["spec"].get("ingress", []):
            ports = rule.get("ports")
            if ports is not None and not any(named.get(p["port"], p["port"]) == port for p in ports):
                continue
            peers = rule.get("from")
            if peers is None:
                return True
            for peer in peers:
                ns_sel, pod_sel = peer.get("namespaceSelector"), peer.get("podSelector")
                ns_ok = (ns_sel == {} or _selects(ns_sel, src_ns)) if ns_sel is not None else same_ns
                pod_ok = pod_sel is None or pod_sel == {} or _selects(pod_sel, src)
                if ns_ok and pod_ok:
                    return True
    return False


def test_k8s_network_policy() -> None:
    """Who may reach what, evaluated: the gateway's gRPC port from anywhere; metrics from the monitoring
    namespace; Ray (the client port and the dashboard among it) from Ray nodes, the gateways, and the
    dashboard from the KubeRay operator; the database from what reads it; nothing else."""
    pods = {kind: labels for kind, (labels, _) in pod_labels().items()}
    chimera_ns = {"kubernetes.io/metadata.name": NS}
    elsewhere = {"kubernetes.io/metadata.name": "apps"}
    monitoring = {"kubernetes.io/metadata.name": "monitoring"}
    stranger = {"app": "something-else"}
    operator = {"app.kubernetes.io/name": "kuberay-operator"}
    prometheus = {"app.kubernetes.io/name": "prometheus"}

    # The gateway: gRPC from anyone; metrics only from monitoring; Ray ports only from Ray nodes.
    assert allowed(stranger, elsewhere, "gateway", GRPC_PORT)
    assert allowed(prometheus, monitoring, "gateway", METRICS_PORT)
    assert not allowed(stranger, elsewhere, "gateway", METRICS_PORT)
    assert not allowed(stranger, chimera_ns, "gateway", METRICS_PORT)
    for port in (6379, 10001, 8265, 52365, 8000):
        assert not allowed(stranger, elsewhere, "gateway", port)
        assert allowed(pods["ray-worker"], chimera_ns, "gateway", port)
    # Ray: every port from Ray nodes and the gateways; the dashboard also from the operator; metrics from
    # monitoring; nothing from anyone else (the retrain job runs no Ray).
    for dst in ("ray-head", "ray-worker"):
        for port in (6379, 8265, 10001, 8000, 8080, 52365):
            for src in ("gateway", "ray-head", "ray-worker"):
                assert allowed(pods[src], chimera_ns, dst, port), (src, dst, port)
            assert not allowed(stranger, elsewhere, dst, port)
            assert not allowed(stranger, chimera_ns, dst, port)
            assert not allowed(pods["retrain"], chimera_ns, dst, port)
        assert allowed(prometheus, monitoring, dst, 8080) and not allowed(prometheus, monitoring, dst, 8265)
    assert allowed(operator, {"kubernetes.io/metadata.name": "ray-system"}, "ray-head", 8265)
    assert not allowed(operator, {"kubernetes.io/metadata.name": "ray-system"}, "ray-head", 10001)
    assert not allowed(operator, {"kubernetes.io/metadata.name": "ray-system"}, "ray-head", 6379)
    # The registry database (when it runs in the namespace): 5432 from its readers only.
    for src in ("gateway", "ray-head", "ray-worker", "retrain"):
        assert allowed(pods[src], chimera_ns, "registry-db", 5432)
    assert not allowed(stranger, chimera_ns, "registry-db", 5432)
    assert not allowed(stranger, elsewhere, "registry-db", 5432)
    assert not allowed(prometheus, monitoring, "registry-db", 5432)
    # Default deny: a pod of the namespace no other policy selects takes nothing.
    (deny,) = [p for p in by_kind("NetworkPolicy") if p["spec"]["podSelector"] == {}]
    assert deny["spec"]["policyTypes"] == ["Ingress"] and not deny["spec"].get("ingress")
