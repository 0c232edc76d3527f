"""deploy/: no Docker engine or Kubernetes cluster runs here, so the files are parsed and checked against the
code they deploy: images, ports (the defaults of `chimera serve`), environment names (read back through
chimera.settings), mounted files, cross-references between services, and the Ray Serve config against
Ray's own schema. The container entrypoint runs for real with stand-ins for `ray` and `chimera`."""

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

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
ENV_NAMES = ("CHIMERA_REGISTRY_URL", "CHIMERA_ADMIN_TOKEN", "RAY_ADDRESS")


def serve_defaults() -> dict[str, object]:
    from chimera.cli import serve

    return {k: p.default for k, p in inspect.signature(serve).parameters.items()}


GRPC_PORT = 50051
METRICS_PORT = 9090


def test_cli_serve_defaults_are_what_deploy_assumes() -> None:
    d = serve_defaults()
    assert (d["port"], d["metrics_port"], d["host"]) == (GRPC_PORT, METRICS_PORT, "0.0.0.0")


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
    assert len(out) == 1 and out[0].startswith(f"{venv}/bin/python -m grpc_tools.protoc"), out
    assert "--grpc_python_out=." in out[0] and "pip" not in out[0]


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
    rc, calls, _ = run_entrypoint(fake_bin, "train", "--model", "m", "--synthetic", "100")
    assert calls[-1] == "chimera train --model m --synthetic 100"


# ---------------------------------------------------------------- docker-compose

def compose() -> dict:
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())


def interpolate(value: str) -> str:
    """Compose's ${VAR:-default} with nothing set in the environment."""
    return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", value)


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
    assert f"{GRPC_PORT}:{GRPC_PORT}" in gw["ports"]
    env = gw["environment"]
    assert set(ENV_NAMES) <= set(env)
    url = make_url(interpolate(env["CHIMERA_REGISTRY_URL"]))
    pg = services["postgres"]["environment"]
    assert (url.drivername, url.host, url.database, url.username) == (
        "postgresql+psycopg2", "postgres", pg["POSTGRES_DB"], pg["POSTGRES_USER"])
    assert url.password == interpolate(pg["POSTGRES_PASSWORD"])
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
    assert url.hostname == "prometheus" and url.port == 9090 and "9090:9090" in compose()["services"][
        "prometheus"]["ports"]
    dash = json.loads((DEPLOY / "grafana" / "dashboards" / "chimera.json").read_text())
    assert any(v["type"] == "datasource" and v["query"] == "prometheus" for v in dash["templating"]["list"])


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
        # The replica gets the pod's registry URL and the version the config names.
        args = built._bound_deployment.init_args
        assert args[:3] == ("postgresql+psycopg2://u:p@db:5432/x", app["args"]["model"],
                            int(app["args"]["version"]))


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
        "postgresql+psycopg2://u:p@db:5432/x", "m", 1, "console")


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
    required = Counter(["Namespace", "Secret", "Secret", "RayService", "Deployment", "Service", "Service",
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
    assert Version(rc["rayVersion"]) >= Version("2.40")  # pyproject: ray[serve]>=2.40
    assert rc["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    assert rc["workerGroupSpecs"] and all(g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
                                          for g in rc["workerGroupSpecs"])
    head = rc["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {"gcs-server": 6379, "dashboard": 8265}.items() <= {p["name"]: p["containerPort"]
                                                               for p in head["ports"]}.items()
    for c in containers(rs):
        assert c["image"].split(":")[0] == "chimera"  # the gateway's image (kustomize sets the registry)
        assert "CHIMERA_REGISTRY_URL" in {e["name"] for e in c["env"]}


def secret_keys() -> dict[str, set[str]]:
    return {s["metadata"]["name"]: set(s["stringData"]) for s in by_kind("Secret")}


def test_k8s_gateway_deployment() -> None:
    from chimera.v1 import prediction_pb2

    (dep,) = by_kind("Deployment")
    (rs,) = by_kind("RayService")
    tmpl = dep["spec"]["template"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= tmpl["metadata"]["labels"].items()
    (c,) = containers(dep)
    assert c["image"].split(":")[0] == "chimera"
    assert c["args"][0] == "serve"
    assert int(option_value(c["args"], "--port")) == GRPC_PORT
    assert int(option_value(c["args"], "--metrics-port")) == METRICS_PORT
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"grpc": GRPC_PORT, "metrics": METRICS_PORT}
    env = {e["name"]: e for e in c["env"]}
    assert set(ENV_NAMES) <= set(env)
    keys = secret_keys()
    for name in ("CHIMERA_REGISTRY_URL", "CHIMERA_ADMIN_TOKEN"):  # the Postgres reference and the token
        ref = env[name]["valueFrom"]["secretKeyRef"]
        assert ref["key"] in keys[ref["name"]], ref
    host, port = env["RAY_ADDRESS"]["value"].split(":")
    assert host == f"{rs['metadata']['name']}-head-svc" and int(port) == 6379  # KubeRay's head Service
    service_name = prediction_pb2.DESCRIPTOR.services_by_name["PredictionService"].full_name
    for probe in ("startupProbe", "readinessProbe"):
        assert c[probe]["grpc"] == {"port": GRPC_PORT, "service": service_name}
    assert c["livenessProbe"]["grpc"]["port"] == GRPC_PORT
    grace = float(option_value(c["args"], "--grace"))
    assert tmpl["spec"]["terminationGracePeriodSeconds"] > grace + 5  # drain + log flush fit in
    ann = tmpl["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true" and int(ann["prometheus.io/port"]) == METRICS_PORT
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    assert "/app/.chimera" in mounts


def test_k8s_services_and_monitoring() -> None:
    (dep,) = by_kind("Deployment")
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
