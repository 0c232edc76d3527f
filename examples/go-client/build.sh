#!/bin/sh
# Build the Go example client offline from Debian's packages (protos/build-go.sh says how and what it needs).
# Usage: examples/go-client/build.sh [OUTPUT]   (default: examples/go-client/bin/chimera-go-client)
set -eu
here=$(cd "$(dirname "$0")" && pwd)
exec "$here/../../protos/build-go.sh" "$here" "${1:-$here/bin/chimera-go-client}"
