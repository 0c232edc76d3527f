#!/bin/sh
# Build chimera-goload (the Go load client of `chimera bench`) offline from Debian's packages, exactly as
# examples/go-client/build.sh builds the Go example, so `make bench` needs no network:
#   1. protoc + protoc-gen-go + protoc-gen-go-grpc generate Go code for protos/chimera/v1 into a temporary
#      GOPATH at the protos' go_package path (github.com/chimera-ml/chimera/gen/go/chimera/v1);
#   2. go build with GO111MODULE=off GOPROXY=off over that GOPATH and /usr/share/gocode
#      (golang-google-grpc-dev, golang-google-protobuf-dev, golang-github-golang-protobuf-1-5-dev).
# Usage: loadtest/goload/build.sh [OUTPUT]   (default: loadtest/goload/bin/chimera-goload)
# Needs: golang-go golang-google-grpc-dev golang-google-protobuf-dev golang-github-golang-protobuf-1-5-dev
#        protobuf-compiler protoc-gen-go protoc-gen-go-grpc   (`make sysdeps` installs them as root)
# Exit 3 when any of them is missing (the message names what to install).
set -eu

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
out=${1:-$here/bin/chimera-goload}
case $out in /*) ;; *) out=$(pwd)/$out ;; esac
gocode=${CHIMERA_GOCODE:-/usr/share/gocode}

missing=""
for tool in go protoc protoc-gen-go protoc-gen-go-grpc; do
  command -v "$tool" >/dev/null 2>&1 || missing="$missing $tool"
done
for pkg in google.golang.org/grpc google.golang.org/protobuf github.com/golang/protobuf; do
  [ -d "$gocode/src/$pkg" ] || missing="$missing $gocode/src/$pkg"
done
if [ -n "$missing" ]; then
  echo "build.sh: missing:$missing" >&2
  echo "build.sh: install golang-go golang-google-grpc-dev golang-google-protobuf-dev" \
       "golang-github-golang-protobuf-1-5-dev protobuf-compiler protoc-gen-go protoc-gen-go-grpc" >&2
  exit 3
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/chimera-goload.XXXXXX")
trap 'rm -rf "$work"' EXIT INT TERM
gen="$work/src/github.com/chimera-ml/chimera/gen/go"
app="$work/src/github.com/chimera-ml/chimera/loadtest/goload"
mkdir -p "$gen" "$app"

# paths=source_relative writes chimera/v1/*.pb.go under $gen, i.e. at the go_package import path.
protoc -I "$root/protos" \
  --go_out=paths=source_relative:"$gen" \
  --go-grpc_out=paths=source_relative:"$gen" \
  "$root"/protos/chimera/v1/*.proto
cp "$here"/*.go "$app/"

# Offline: no module proxy, no network. Keep the build cache when HOME is set (faster rebuilds).
if [ -z "${GOCACHE:-}" ] && [ -z "${HOME:-}" ] && [ -z "${XDG_CACHE_HOME:-}" ]; then
  export GOCACHE="$work/cache"
fi
mkdir -p "$(dirname "$out")"
cd "$app"
GO111MODULE=off GOPROXY=off GOFLAGS= GOPATH="$work:$gocode" go build -o "$out" .
echo "built $out"
