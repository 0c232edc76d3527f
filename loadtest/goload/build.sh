#!/bin/sh
# Build chimera-goload (the Go load client of `chimera bench`) offline from Debian's packages, the same way
# as the Go example (protos/build-go.sh says how and what it needs), so `make bench` needs no network.
# Usage: loadtest/goload/build.sh [OUTPUT]   (default: loadtest/goload/bin/chimera-goload)
# Exit 3 when a build tool or Go package is missing (the message names what to install).
set -eu
here=$(cd "$(dirname "$0")" && pwd)
exec "$here/../../protos/build-go.sh" "$here" "${1:-$here/bin/chimera-goload}"
