#!/usr/bin/env bash
# Builds the kubelet of the newest Kubernetes release we test against, or that release's control
# plane, from Go modules pinned in integration/go.mod and go.sum (k8s.io/kubernetes and its staging
# modules, through the Go module proxy), and prints the result's path as the last line of stdout;
# progress goes to stderr.
#
#   build-newest-kubelet.sh                  the kubelet binary
#   build-newest-kubelet.sh --control-plane  a directory with kube-apiserver,
#                                            kube-controller-manager and kube-scheduler
#   ... --release 1.36                       the same of an older release, from the module
#                                            pinned in integration/releases/1.36/go.mod
#
# - Results are cached at $KDP_E2E_CACHE (default /var/cache/kubelet-device-plugins/e2e) as
#   kubelet-<version>-<go.sum hash> and control-plane-<version>-<go.sum hash>/, so a warm run
#   builds nothing; a change of either rebuilds. Cold on 2 cores: the kubelet about 4.5 minutes
#   after about 20 s of module downloads; the control plane about 7 minutes more (it shares the
#   kubelet's build cache).
# - Needs Go (1.26 here; go.mod says which, and GOTOOLCHAIN may name a newer one).
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
CACHE_DIR=${KDP_E2E_CACHE:-/var/cache/kubelet-device-plugins/e2e}

log() { printf '[build-newest-kubelet] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

what=kubelet
MODULE=$HERE
while (($#)); do
  case $1 in
    --control-plane) what=control-plane ;;
    --release)
      [[ ${2:-} =~ ^1\.[0-9]+$ && -f $HERE/releases/${2:-}/go.mod ]] ||
        die "--release needs a release with a go.mod under $HERE/releases: $(ls "$HERE/releases" | tr '\n' ' ')"
      MODULE=$HERE/releases/$2
      shift
      ;;
    *) die "usage: $0 [--control-plane] [--release 1.N]" ;;
  esac
  shift
done
command -v go >/dev/null || die "no go on PATH"
version=$(cd "$MODULE" && go list -m -f '{{.Version}}' k8s.io/kubernetes) ||
  die "cannot read the k8s.io/kubernetes version from $MODULE/go.mod"
[[ $version =~ ^v1\.([0-9]+)\.([0-9]+)$ ]] || die "unexpected k8s.io/kubernetes version $version"
minor=${BASH_REMATCH[1]}
sum=$(sha256sum "$MODULE/go.sum" | cut -c1-12)
out="$CACHE_DIR/$what-$version-$sum"
if [[ -e $out ]]; then
  log "using cached $out"
  printf '%s\n' "$out"
  exit 0
fi
mkdir -p "$CACHE_DIR"
log "building the $what $version from Go modules ($(go version))"
# What `--version` reports, as the release build stamps it.
pkg=k8s.io/component-base/version
ldflags="-s -w -X $pkg.gitVersion=$version -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
start=$SECONDS
rm -rf "$out.tmp"
if [[ $what == kubelet ]]; then
  (cd "$MODULE" && go build -mod=readonly -trimpath -ldflags "$ldflags" -o "$out.tmp" \
    k8s.io/kubernetes/cmd/kubelet) >&2 || die "go build failed"
else
  mkdir -p "$out.tmp"
  (cd "$MODULE" && go build -mod=readonly -trimpath -ldflags "$ldflags" -o "$out.tmp/" \
    k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
    k8s.io/kubernetes/cmd/kube-scheduler) >&2 || die "go build failed"
fi
mv "$out.tmp" "$out"
log "built $out in $((SECONDS - start))s"
printf '%s\n' "$out"
