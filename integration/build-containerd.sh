#!/usr/bin/env bash
# Builds the containerd 2 that the end-to-end suite runs beside the newest kubelet: containerd,
# containerd-shim-runc-v2 and ctr, from Go modules pinned in integration/containerd/go.mod and
# go.sum (its `tool` lines; github.com/containerd/containerd/v2 through the Go module proxy), and
# prints the directory holding bin/containerd, bin/containerd-shim-runc-v2 and bin/ctr as the last
# line of stdout; progress goes to stderr.
#
# - Cached at $KDP_E2E_CACHE (default /var/cache/kubelet-device-plugins/e2e) as
#   containerd-<version>-<go.sum hash>/, so a warm run builds nothing; a change of either rebuilds.
#   It is built into a temporary directory beside it and renamed at the end: a half-done build is
#   never used. Cold (empty GOCACHE, 2 cores, nothing else running): 110 s, nearly all of it
#   containerd (99 s; the shim and ctr then reuse its packages: 3 s and 8 s), after about 15 s of
#   module downloads; 230 s with a cargo build sharing the cores. Warm: nothing to do, 0.03 s.
# - CGO_ENABLED=0: static binaries that need nothing from the host. That leaves out only the btrfs
#   snapshotter (cgo), which the suite disables anyway. The shim is built with no_grpc, as
#   containerd's Makefile builds it.
# - Needs Go (1.26.6 or newer: containerd v2.4.2's go.mod says so; GOTOOLCHAIN may name one).
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
MOD=$HERE/containerd
CACHE_DIR=${KDP_E2E_CACHE:-/var/cache/kubelet-device-plugins/e2e}
PKG=github.com/containerd/containerd/v2

log() { printf '[build-containerd] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

command -v go >/dev/null || die "no go on PATH"
version=$(cd "$MOD" && go list -m -f '{{.Version}}' "$PKG") ||
  die "cannot read the $PKG version from $MOD/go.mod"
[[ $version =~ ^v2\.[0-9]+\.[0-9]+$ ]] || die "unexpected $PKG version $version"
sum=$(sha256sum "$MOD/go.sum" | cut -c1-12)
out="$CACHE_DIR/containerd-$version-$sum"
bins=(containerd containerd-shim-runc-v2 ctr)
cached=1
for b in "${bins[@]}"; do [[ -x $out/bin/$b ]] || cached=0; done
if ((cached)); then
  log "using cached $out"
  printf '%s\n' "$out"
  exit 0
fi
mkdir -p "$CACHE_DIR"
tmp=$(mktemp -d "$out.tmp.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/bin"
log "building containerd $version from Go modules ($(go version))"
# What `containerd --version` reports. No git checkout to take a commit from: the revision is the
# module's hash from go.sum, which names the exact source just as well.
revision=$(awk -v m="$PKG" -v v="$version" '$1 == m && $2 == v { print $3 }' "$MOD/go.sum")
[[ -n $revision ]] || die "no go.sum line for $PKG $version"
ldflags="-s -w -X $PKG/version.Version=$version -X $PKG/version.Revision=$revision"
ldflags+=" -X $PKG/version.Package=$PKG"
start=$SECONDS
for b in "${bins[@]}"; do
  tags=urfave_cli_no_docs
  [[ $b != containerd-shim-runc-v2 ]] || tags+=",no_grpc"
  t=$SECONDS
  (cd "$MOD" && CGO_ENABLED=0 go build -mod=readonly -trimpath -tags "$tags" -ldflags "$ldflags" \
    -o "$tmp/bin/$b" "$PKG/cmd/$b") >&2 || die "go build $PKG/cmd/$b failed"
  log "built $b in $((SECONDS - t))s"
done
"$tmp/bin/containerd" --version >&2 || die "the containerd just built does not run"
chmod 755 "$tmp"
rm -rf "$out"
mv "$tmp" "$out"
trap - EXIT
log "built $out in $((SECONDS - start))s"
printf '%s\n' "$out"
