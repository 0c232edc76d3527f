#!/bin/sh
# Build a Go program of this repository offline from Debian's packages, in GOPATH mode. Shared by
# examples/go-client/build.sh (the Go example) and loadtest/goload/build.sh (the bench's load client):
#   1. protoc + protoc-gen-go + protoc-gen-go-grpc generate Go code from protos/ (chimera/v1 and the Open
#      Inference Protocol) into a temporary GOPATH, at the import paths the protos' go_package names
#      (github.com/chimera-ml/chimera/gen/go/...);
#   2. go build with GO111MODULE=off GOPROXY=off over that GOPATH and /usr/share/gocode
#      (golang-google-grpc-dev, golang-google-protobuf-dev, golang-github-golang-protobuf-1-5-dev).
# Usage: protos/build-go.sh SOURCE_DIR OUTPUT   (SOURCE_DIR: the program's directory in this repository)
# Needs: golang-go golang-google-grpc-dev golang-google-protobuf-dev golang-github-golang-protobuf-1-5-dev
#        protobuf-compiler protoc-gen-go protoc-gen-go-grpc   (`make sysdeps` installs them as root)
# Exit 3 when any of them is missing (the message names what to install).
set -eu

root=$(cd "$(dirname "$0")/.." && pwd)
src=$(cd "$1" && pwd)
out=$2
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
app="$work/src/github.com/chimera-ml/chimera/${src#"$root"/}"
mkdir -p "$gen" "$app"

# paths=source_relative writes chimera/v1/*.pb.go and inference/*.pb.go under $gen, i.e. at the
# go_package import paths.
for protos in "$root"/protos/chimera/v1/*.proto "$root"/protos/inference/grpc_predict_v2.proto; do
  protoc -I "$root/protos" \
    --go_out=paths=source_relative:"$gen" \
    --go-grpc_out=paths=source_relative:"$gen" \
    $protos
done
cp "$src"/*.go "$app/"

# Offline: no module proxy, no network. Keep the build cache when HOME is set (faster rebuilds).
if [ -z "${GOCACHE:-}" ] && [ -z "${HOME:-}" ] && [ -z "${XDG_CACHE_HOME:-}" ]; then
  export GOCACHE="$work/cache"
fi
mkdir -p "$(dirname "$out")"
cd "$app"
GO111MODULE=off GOPROXY=off GOFLAGS= GOPATH="$work:$gocode" go build -o "$out" .
echo "built $out"
