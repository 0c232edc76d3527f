#!/bin/sh
# Entrypoint of the Chimera image (deploy/Dockerfile).
#   serve [ARGS]     join the Ray cluster at RAY_ADDRESS as a node without CPUs, so the gateway's handles
#                    to the replicas are local Ray calls, then `chimera serve ARGS`. Without RAY_ADDRESS
#                    (or with ray://... or auto) the gateway handles Ray itself (a local Ray, or Ray Client).
#   ray-head [ARGS]  a Ray head node in the foreground: GCS 6379, metrics 8080, and the dashboard on 8265 of
#                    CHIMERA_RAY_DASHBOARD_HOST (default 127.0.0.1: the container's loopback only; the
#                    dashboard runs jobs for whoever reaches it). Set RAY_AUTH_MODE (token, with
#                    RAY_AUTH_TOKEN) on every node and driver: deploy/docker-compose.yml does.
#   probe [SERVICE] [TARGET]
#                    gRPC health check of this container's gateway (TARGET default 127.0.0.1:50051), exit 0
#                    when SERVING: Kubernetes exec probes, since kubelet's own gRPC probe speaks plaintext
#                    only. TLS when CHIMERA_TLS_CERT is set, trusting CHIMERA_TLS_CA (default: that
#                    certificate), checking the name CHIMERA_TLS_SERVER_NAME, and sending
#                    CHIMERA_TLS_CLIENT_CERT/KEY when the gateway asks for client certificates.
#   anything else    `chimera ...` (train, db upgrade, models list, canary set, rollout status, ...).
set -eu

join_ray_cluster() {
  case "${RAY_ADDRESS:-}" in
    ""|auto|ray://*) return 0 ;;
  esac
  tries=0
  # CHIMERA_RAY_START_ARGS: extra `ray start` flags, e.g. --node-ip-address=<pod IP> on Kubernetes.
  # shellcheck disable=SC2086
  until ray start --address="$RAY_ADDRESS" --num-cpus="${CHIMERA_GATEWAY_RAY_CPUS:-0}" --disable-usage-stats \
      ${CHIMERA_RAY_START_ARGS:-}; do
    tries=$((tries + 1))
    if [ "$tries" -ge "${CHIMERA_RAY_JOIN_TRIES:-30}" ]; then
      echo "chimera-entrypoint: could not join the Ray cluster at $RAY_ADDRESS" >&2
      exit 1
    fi
    echo "chimera-entrypoint: Ray head at $RAY_ADDRESS not reachable yet, retrying" >&2
    sleep 2
  done
}

cmd="${1:-serve}"
[ "$#" -gt 0 ] && shift
case "$cmd" in
  ray-head)
    exec ray start --head --block --port=6379 --dashboard-host="${CHIMERA_RAY_DASHBOARD_HOST:-127.0.0.1}" --metrics-export-port=8080 \
      --disable-usage-stats "$@"
    ;;
  probe)
    exec python - "$@" <<'PROBE'
import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

service = sys.argv[1] if len(sys.argv) > 1 else ""
target = sys.argv[2] if len(sys.argv) > 2 else "127.0.0.1:50051"
env = os.environ.get


def read(path):
    with open(path, "rb") as f:
        return f.read()


if env("CHIMERA_TLS_CERT"):
    creds = grpc.ssl_channel_credentials(
        root_certificates=read(env("CHIMERA_TLS_CA") or env("CHIMERA_TLS_CERT")),
        private_key=read(env("CHIMERA_TLS_CLIENT_KEY")) if env("CHIMERA_TLS_CLIENT_KEY") else None,
        certificate_chain=read(env("CHIMERA_TLS_CLIENT_CERT")) if env("CHIMERA_TLS_CLIENT_CERT") else None)
    name = env("CHIMERA_TLS_SERVER_NAME")
    channel = grpc.secure_channel(target, creds,
                                  options=[("grpc.ssl_target_name_override", name)] if name else [])
else:
    channel = grpc.insecure_channel(target)
try:
    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                      timeout=float(env("CHIMERA_PROBE_TIMEOUT") or 3))
except grpc.RpcError as exc:
    print(f"chimera-probe: {target} {service or '(server)'}: {exc.code().name}: {exc.details()}",
          file=sys.stderr)
    sys.exit(1)
status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
print(f"chimera-probe: {target} {service or '(server)'}: {status}")
sys.exit(0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1)
PROBE
    ;;
  serve)
    join_ray_cluster
    exec chimera serve "$@"
    ;;
  *)
    exec chimera "$cmd" "$@"
    ;;
esac
