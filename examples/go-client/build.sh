#!/bin/sh
# Build the Go example client offline from Debian's packages, in GOPATH mode:
#   1. protoc + protoc-gen-go + protoc-gen-go-grpc generate Go code from protos/ into a temporary GOPATH,
#      at the import path the protos' go_package names (github.com/chimera-ml/chimera/gen/go/chimera/v1);
#   2. go build with GO111MODULE=off over that GOPATH and /usr/share/gocode (golang-google-grpc-dev,
#      golang-google-protobuf-dev, golang-github-golang-protobuf-1-5-dev).
# Usage: examples/go-client/build.sh [OUTPUT]   (default: examples/go-client/bin/chimera-go-client)
# Needs: golang-go golang-google-grpc-dev golang-google-protobuf-dev golang-github-golang-protobuf-1-5-dev
#        protobuf-compiler protoc-gen-go protoc-gen-go-grpc   (`make sysdeps` installs them as root)
set -eu

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
out=${1:-$here/bin/chimera-go-client}
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

work=$(mktemp -d "${TMPDIR:-/tmp}/chimera-go.XXXXXX")
trap 'rm -rf "$work"' EXIT INT TERM
gen="$work/src/github.com/chimera-ml/chimera/gen/go"
app="$work/src/github.com/chimera-ml/chimera/examples/go-client"
mkdir -p "$gen" "$app"

# paths=source_relative writes chimera/v1/*.pb.go under $gen, i.e. at the go_package import path.
protoc -I "$root/protos" \
  --go_out=paths=source_relative:"$gen" \
  --go-grpc_out=paths=source_relative:"$gen" \
  "$root"/protos/chimera/v1/*.proto
# The Open Inference Protocol's proto, at its go_package path (.../gen/go/inference).
protoc -I "$root/protos" \
  --go_out=paths=source_relative:"$gen" \
  --go-grpc_out=paths=source_relative:"$gen" \
  "$root"/protos/inference/grpc_predict_v2.proto
cp "$here"/*.go "$app/"

# Offline: no module proxy, no network. Keep the build cache when HOME is set (faster rebuilds).
if [ -z "${GOCACHE:-}" ] && [ -z "${HOME:-}" ] && [ -z "${XDG_CACHE_HOME:-}" ]; then
  export GOCACHE="$work/cache"
fi
mkdir -p "$(dirname "$out")"
cd "$app"
GO111MODULE=off GOPROXY=off GOFLAGS= GOPATH="$work:$gocode" go build -o "$out" .
echo "built $out"
