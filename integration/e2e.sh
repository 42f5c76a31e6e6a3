#!/usr/bin/env bash
# End-to-end suite of kubelet-device-plugins against a real kubelet and containerd:
#
#   sudo bash integration/e2e.sh [pytest arguments, e.g. -k restart]
#   sudo bash integration/e2e.sh --cluster [pytest arguments]
#
# --cluster runs integration/cluster instead of integration/tests: the same node with etcd,
# kube-apiserver, kube-controller-manager and kube-scheduler of the kubelet's release (built like
# the kubelet and cached), the plugin installed with `kubectl apply -k`.
#
# This script does what shell is natural for: it installs the Debian packages the node needs, finds
# or builds the binaries (the kubelet, its sandbox's pause, containerd 2 for newer kubelets) and a
# pinned pytest, then runs the scenarios in integration/tests, which bring the node up in a private
# namespace (integration/framework) and tear it down, pass or fail. The last line is
# "N passed, M failed"; the exit status is non-zero if anything failed.
#
# Environment:
#   PLUGIN_BIN        the plugin binary (default: target/debug/kubelet-device-plugins of this repo)
#   KUBELET           a kubelet binary (default: 1.20.2, built by build-kubelet.sh and cached)
#   KDP_E2E_CONTAINERD  "debian" (containerd 1.6 from Debian) or a directory holding
#                     bin/containerd, bin/ctr and the shim (default: Debian's for kubelets before
#                     1.27, containerd 2 from build-containerd.sh for newer ones)
#   KDP_E2E_CACHE     cache for the built binaries and pytest (/var/cache/kubelet-device-plugins/e2e)
#   KDP_E2E_KEEP=1    keep the temporary state directory (logs, configs) even when all passed
#   KDP_E2E_PORT_BASE ports: BASE+50 kubelet, BASE+55 read-only, BASE+48 healthz (default 20200)
#   KDP_E2E_REGISTRATION  space-separated ways to run the plugin for every scenario: the
#                     --registration modes "kubelet-socket" and "plugin-watcher" (the plugin as a
#                     process), and "pod" (default: all that apply: pod needs PLUGIN_IMAGE)
#   PLUGIN_IMAGE      an OCI image tarball of the plugin (integration/build-image.sh): enables the
#                     "pod" runs, the plugin as a static pod made from the DaemonSet's pod template
#                     (`kubectl kustomize KDP_E2E_MANIFESTS`, default manifests/; KUBECTL=kubectl)
#   KDP_E2E_CONTROL_PLANE  with --cluster: a directory with kube-apiserver, kube-controller-manager
#                     and kube-scheduler (default: built for the kubelet's release: Debian's tree
#                     for 1.20.2, Go modules for the newest); etcd is Debian's etcd-server
#   HELM              with --cluster: the helm binary the chart scenarios run (default: helm on
#                     PATH; .ci/run builds v4 from .ci/tools/go.mod)
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(dirname "$HERE")
export KDP_E2E_CACHE=${KDP_E2E_CACHE:-/var/cache/kubelet-device-plugins/e2e}
PLUGIN_BIN=${PLUGIN_BIN:-$REPO/target/debug/kubelet-device-plugins}
PYTEST_PINS=(pytest==9.2.0 PyYAML==6.0.3)

say() { printf '%s [e2e] %s\n' "$(date +%T)" "$*" >&2; }
die() { say "SETUP ERROR: $*"; echo "0 passed, 1 failed"; exit 2; }

install_packages() {
  local need=() pkg
  local pkgs=(containerd runc busybox-static curl python3 python3-venv util-linux iproute2
    containernetworking-plugins etcd-server openssl gcc libc6-dev)
  for pkg in "${pkgs[@]}"; do
    [[ $(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null) == "install ok installed" ]] || need+=("$pkg")
  done
  ((${#need[@]})) || return 0
  say "installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  # Where systemd runs, keep apt from starting the system's containerd.service: ours is separate
  # (own socket, root and state), but nothing needs a second one running. policy-rc.d is only
  # created if absent, and removed again.
  local policy=""
  if [[ -d /run/systemd/system && ! -e /usr/sbin/policy-rc.d ]]; then
    policy=/usr/sbin/policy-rc.d
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod 755 "$policy"
  fi
  local rc=0
  apt-get install -y -qq --no-install-recommends "${need[@]}" >&2 || rc=$?
  [[ -z $policy ]] || rm -f "$policy"
  ((rc == 0)) || die "apt-get install failed"
}

# pytest and PyYAML, pinned, in a virtualenv of the suite's own (Debian's python3).
pytest_python() {
  local venv=$KDP_E2E_CACHE/pytest-venv
  if [[ ! -f $venv/pins ]] || [[ $(cat "$venv/pins") != "${PYTEST_PINS[*]}" ]]; then
    rm -rf "$venv"
    /usr/bin/python3 -m venv "$venv" >&2 || die "python3 -m venv $venv failed"
    "$venv/bin/pip" install -q --disable-pip-version-check "${PYTEST_PINS[@]}" >&2 ||
      die "pip install ${PYTEST_PINS[*]} failed"
    echo "${PYTEST_PINS[*]}" >"$venv/pins"
  fi
  echo "$venv/bin/python"
}

main() {
  local suite=tests
  if [[ ${1:-} == --cluster ]]; then
    suite=cluster
    shift
  fi
  [[ $(id -u) -eq 0 ]] || die "run as root"
  [[ -x $PLUGIN_BIN ]] || die "PLUGIN_BIN=$PLUGIN_BIN is not executable (build the plugin first)"
  install_packages
  local d
  for d in /dev/kvm /dev/net/tun /dev/fuse; do
    [[ -c $d ]] || die "this machine has no $d"
  done
  mkdir -p "$KDP_E2E_CACHE"
  local kubelet pause version minor
  kubelet=$(bash "$HERE/build-kubelet.sh" | tail -1) && [[ -x $kubelet ]] || die "no kubelet binary"
  pause=$(bash "$HERE/build-kubelet.sh" --pause | tail -1) && [[ -x $pause ]] || die "no pause binary"
  version=$("$kubelet" --version 2>/dev/null || true)
  [[ $version =~ v1\.([0-9]+)\. ]] || die "cannot tell the kubelet's version from \"$version\""
  minor=${BASH_REMATCH[1]}
  local containerd=${KDP_E2E_CONTAINERD:-}
  if [[ -z $containerd ]]; then
    if ((minor < 27)); then containerd=debian; else
      containerd=$(bash "$HERE/build-containerd.sh" | tail -1) || die "build-containerd.sh failed"
    fi
  fi
  [[ $containerd == debian ]] && containerd=""
  [[ -z $containerd || -x $containerd/bin/containerd ]] || die "no $containerd/bin/containerd"
  if [[ $suite == cluster ]]; then
    local cp=${KDP_E2E_CONTROL_PLANE:-}
    if [[ -z $cp ]]; then
      # The release's own: Debian's before 1.27, a pinned older release's (releases/1.N), or
      # the newest's.
      local release=()
      [[ -f $HERE/releases/1.$minor/go.mod ]] && release=(--release "1.$minor")
      if ((minor < 27)); then cp=$(bash "$HERE/build-kubelet.sh" --control-plane | tail -1)
      else cp=$(bash "$HERE/build-newest-kubelet.sh" --control-plane "${release[@]}" | tail -1); fi ||
        die "no control plane"
    fi
    local b
    for b in kube-apiserver kube-controller-manager kube-scheduler; do
      [[ -x $cp/$b ]] || die "no $cp/$b"
      [[ $("$cp/$b" --version 2>&1) == *"${version#Kubernetes }"* ]] ||
        die "$cp/$b is $("$cp/$b" --version 2>&1), not the kubelet's ${version#Kubernetes }"
    done
    say "control plane $cp, etcd $(etcd --version | head -1), $("${KUBECTL:-kubectl}" version --client 2>/dev/null | head -1)"
    export KDP_E2E_CONTROL_PLANE=$cp KDP_E2E_ETCD=$(command -v etcd)
  fi
  local py
  py=$(pytest_python)
  say "kubelet $kubelet ($version), containerd ${containerd:-of Debian ($(containerd --version | cut -d' ' -f3))}, plugin $PLUGIN_BIN"
  export KDP_E2E_KUBELET=$kubelet KDP_E2E_KUBELET_MINOR=$minor KDP_E2E_PAUSE=$pause \
    KDP_E2E_CONTAINERD_DIR=$containerd PLUGIN_BIN=$(readlink -f "$PLUGIN_BIN") PYTHON=$py
  cd "$HERE"
  if [[ $suite == cluster ]]; then set -- cluster "$@"; fi
  exec "$py" -m pytest "$@"
}

main "$@"
