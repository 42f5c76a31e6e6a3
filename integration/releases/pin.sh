#!/usr/bin/env bash
# Pins one Kubernetes release's kubelet (and with --control-plane its API server, controller
# manager and scheduler) for build-newest-kubelet.sh --release:
# writes integration/releases/1.N/go.mod and go.sum for k8s.io/kubernetes vX.Y.Z, tidied from that
# module alone (its staging modules pinned to the matching v0.Y.Z tags, since the replaces in its
# own go.mod point inside its tree and do not apply to a module that depends on it).
#
#   integration/releases/pin.sh v1.29.15 [--control-plane]
#
# The go.mod names the newest Go of this machine (the kubelet is built with it, not with the
# release's own Go). Needs Go and the module proxy; downloads, builds nothing.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
version=${1:-}
[[ $version =~ ^v1\.([0-9]+)\.([0-9]+)$ ]] || { echo "usage: $0 v1.N.P [--control-plane]" >&2; exit 2; }
minor=${BASH_REMATCH[1]}
patch=${BASH_REMATCH[2]}
# Only what is built: some releases' staging modules are not all served (1.22.17's
# kube-controller-manager is refused by the module proxy).
binaries=(kubelet)
[[ ${2:-} == --control-plane ]] && binaries+=(kube-apiserver kube-controller-manager kube-scheduler)
dir=$HERE/1.$minor
proxy=$(go env GOPROXY | cut -d, -f1)

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
curl -fsS "$proxy/k8s.io/kubernetes/@v/$version.mod" -o "$work/upstream.mod"
# The staging modules: each `k8s.io/x => ./staging/src/k8s.io/x` in the release's own go.mod.
mapfile -t staging < <(sed -nE 's#^[[:space:]]*(k8s\.io/[a-z0-9-]+)[[:space:]]+=>[[:space:]]+\./staging/.*#\1#p' \
  "$work/upstream.mod" | sort -u)
((${#staging[@]})) || { echo "no staging modules in $version's go.mod" >&2; exit 1; }

mkdir -p "$work/m"
{
  printf '// The %s of Kubernetes %s, built by\n' "${binaries[*]}" "$version"
  printf '// integration/build-newest-kubelet.sh --release 1.%s; written by integration/releases/pin.sh.\n' "$minor"
  printf '// Not product code; the plugin is Rust.\n'
  printf 'module kdp-e2e-peers-1.%s\n\n' "$minor"
  printf 'go %s\n\n' "$(go env GOVERSION | sed -E 's/^go([0-9]+\.[0-9]+).*/\1.0/')"
  printf 'require k8s.io/kubernetes %s\n\n' "$version"
  printf '// k8s.io/kubernetes requires its staging modules at v0.0.0 and replaces them with paths inside\n'
  printf '// its own tree; those replaces do not apply to a module that depends on it, so each is pinned\n'
  printf '// to the tag of the same release.\n'
  printf 'replace (\n'
  for m in "${staging[@]}"; do printf '\t%s => %s v0.%s.%s\n' "$m" "$m" "$minor" "$patch"; done
  printf ')\n'
} > "$work/m/go.mod"
# Tidied against what the binaries import, then the import goes: the go.mod keeps every
# requirement (indirect), which is all `go build -mod=readonly` needs.
{
  printf '//go:build tools\n\npackage peers\n\nimport (\n'
  for b in "${binaries[@]}"; do printf '\t_ "k8s.io/kubernetes/cmd/%s"\n' "$b"; done
  printf ')\n'
} > "$work/m/tools.go"
(cd "$work/m" && go mod tidy)
mkdir -p "$dir"
cp "$work/m/go.mod" "$work/m/go.sum" "$dir/"
echo "pinned $version in $dir"
