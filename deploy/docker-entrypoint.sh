#!/bin/sh
# Entrypoint of the Chimera image (deploy/Dockerfile).
#   serve [ARGS]     join the Ray cluster at RAY_ADDRESS as a node without CPUs, so the gateway's handles
#                    to the replicas are local Ray calls, then `chimera serve ARGS`. Without RAY_ADDRESS
#                    (or with ray://... or auto) the gateway handles Ray itself (a local Ray, or Ray Client).
#   ray-head [ARGS]  a Ray head node in the foreground: GCS 6379, dashboard 8265, metrics 8080.
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
    exec ray start --head --block --port=6379 --dashboard-host=0.0.0.0 --metrics-export-port=8080 \
      --disable-usage-stats "$@"
    ;;
  serve)
    join_ray_cluster
    exec chimera serve "$@"
    ;;
  *)
    exec chimera "$cmd" "$@"
    ;;
esac
