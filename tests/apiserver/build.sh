#!/usr/bin/env bash
# Builds kube-apiserver, etcd and kubectl at the versions pinned in go.mod into a cache directory outside
# the repository ($APIGW_K8S_CACHE, default ~/.cache/apigw), one directory per pinned version set, and
# reuses it while go.mod and go.sum are unchanged. Prints the directory on stdout (last line), progress
# and the build time on stderr. `build.sh --check` only prints the directory, exiting 1 when it is not
# built yet: that is how the cluster test tier (tests/cluster/) finds the binaries.
set -euo pipefail
cd "$(dirname "$0")"
# A module needing a newer Go than the machine's fetches that toolchain through the proxy.
export GOTOOLCHAIN="${GOTOOLCHAIN:-auto}"

k8s=$(awk '$1 == "k8s.io/kubernetes" && $2 ~ /^v/ {print $2}' go.mod)
etcd=$(awk '$1 == "go.etcd.io/etcd/server/v3" && $2 ~ /^v/ {print $2}' go.mod)
out="${APIGW_K8S_CACHE:-$HOME/.cache/apigw}/k8s-$k8s-etcd-$etcd"
stamp=$(cat go.mod go.sum | sha256sum | cut -c1-16)

if [ "$(cat "$out/.stamp" 2>/dev/null)" = "$stamp" ] \
    && [ -x "$out/kube-apiserver" ] && [ -x "$out/etcd" ] && [ -x "$out/kubectl" ]; then
  [ "${1:-}" = --check ] || echo "control-plane binaries up to date in $out" >&2
  echo "$out"
  exit 0
fi
if [ "${1:-}" = --check ]; then
  echo "$out"
  exit 1
fi

echo "building kube-apiserver and kubectl $k8s, etcd $etcd into $out (first build: several minutes)" >&2
start=$(date +%s)
tmp="$out.tmp.$$"
rm -rf "$tmp" && mkdir -p "$tmp"
trap 'rm -rf "$tmp"' EXIT
version="-X k8s.io/component-base/version.gitVersion=$k8s -X k8s.io/client-go/pkg/version.gitVersion=$k8s"
nice -n 10 go build -trimpath -ldflags "-s -w $version" -o "$tmp/" \
  k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kubectl
nice -n 10 go build -trimpath -ldflags "-s -w" -o "$tmp/etcd" go.etcd.io/etcd/server/v3
echo "$stamp" > "$tmp/.stamp"
rm -rf "$out" && mv "$tmp" "$out"
echo "built in $(( $(date +%s) - start )) s" >&2
echo "$out"
