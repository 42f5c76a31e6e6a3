#!/usr/bin/env bash
# End-to-end test of kubelet-device-plugins against a real kubelet (1.20, built from Debian
# bookworm's source package, or any other KUBELET names: .ci/run also runs the newest release,
# from build-newest-kubelet.sh) and a real container runtime (Debian's containerd and runc).
#
#   sudo bash integration/e2e.sh
#
# Environment:
#   PLUGIN_BIN        the plugin binary (default: target/debug/kubelet-device-plugins of this repo)
#   KUBELET           a kubelet binary to use instead of building/caching one (build-kubelet.sh)
#   KDP_E2E_CACHE     cache for the kubelet and pause binaries (/var/cache/kubelet-device-plugins/e2e)
#   KDP_E2E_KEEP=1    keep the temporary state directory (logs, configs) even when all passed
#   KDP_E2E_PORT_BASE ports: BASE+50 kubelet, BASE+55 read-only, BASE+48 healthz (default 20200)
#   KDP_E2E_REGISTRATION  space-separated ways to run the plugin for every scenario: the
#                     --registration modes "kubelet-socket" and "plugin-watcher" (the plugin as a
#                     process), and "pod" (default: all that apply: pod needs PLUGIN_IMAGE)
#   PLUGIN_IMAGE      an OCI image tarball of the plugin (integration/build-image.sh). Enables the
#                     "pod" runs: the image is imported under the name the rendered manifests use,
#                     and the plugin runs as a static pod made from the DaemonSet's pod template
#                     (`kubectl kustomize KDP_E2E_MANIFESTS`, default manifests/; KUBECTL=kubectl)
#
# Everything runs as root inside a private mount namespace whose /run, /var/lib and /var/log are a
# temporary directory's, so the host's /var/lib/kubelet, /run/containerd, /var/log/pods and the
# kernel tunables the kubelet likes to set are left alone. It is a private network namespace too:
# pods get addresses on a CNI bridge that exists only there (the plugin's pod is probed over it),
# and the kubelet listens on that namespace's 127.0.0.1. Every process started is stopped by PID at exit, pass or fail,
# and the cgroups created are removed. The last line is "N passed, M failed"; the exit status is
# non-zero if any scenario failed or the setup broke.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(dirname "$HERE")
PLUGIN_BIN=${PLUGIN_BIN:-$REPO/target/debug/kubelet-device-plugins}
PORT_BASE=${KDP_E2E_PORT_BASE:-20200}
KUBELET_PORT=$((PORT_BASE + 50))
RO_PORT=$((PORT_BASE + 55))
HEALTHZ_PORT=$((PORT_BASE + 48))
NODE=kdp-e2e                          # --hostname-override: static pods are named <name>-$NODE
DOMAIN=devices.anza-labs.dev
RESOURCES=(kvm tun fuse)
declare -A DEV=([kvm]=/dev/kvm [tun]=/dev/net/tun [fuse]=/dev/fuse)     # as containers see them
declare -A REL=([kvm]=kvm [tun]=net/tun [fuse]=fuse)                    # under a --dev-root
COUNT=2                                # --count: containers that may share each device
IMAGE=localhost/kdp-busybox:e2e
PAUSE_IMAGE=k8s.gcr.io/pause:3.2       # the kubelet 1.20 default sandbox image
POD_TIMEOUT=${KDP_E2E_POD_TIMEOUT:-90}
PLUGIN_IMAGE=${PLUGIN_IMAGE:-}
MANIFESTS=${KDP_E2E_MANIFESTS:-$REPO/manifests}
KUBECTL=${KUBECTL:-kubectl}
PLUGIN_POD=kdp-plugin                  # the plugin's static pod, in "pod" runs
CNI_SUBNET=10.88.0.0/24                # pod addresses on the namespace's bridge

PASSED=0
FAILED=0
RESULTS=()
NOTES=()   # plugin behaviour worth a look that no scenario fails on
MEASURES=() # figures worth reporting (BENCHMARKS.md quotes them)

say() { printf '%s [e2e] %s\n' "$(date +%T)" "$*" >&2; }
die() { say "SETUP ERROR: $*"; exit 2; }

# ---------------------------------------------------------------------------------------------
# Packages (idempotent)
# ---------------------------------------------------------------------------------------------
install_packages() {
  local need=() pkg
  local pkgs=(containerd runc busybox-static curl python3 util-linux gcc libc6-dev iproute2
    containernetworking-plugins)
  [[ -z $PLUGIN_IMAGE ]] || pkgs+=(python3-yaml)
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

# ---------------------------------------------------------------------------------------------
# State, processes and teardown
# ---------------------------------------------------------------------------------------------
ROOT=""            # temporary state directory
NSROOT=""          # $ROOT/ns: what /run, /var/lib, /var/log are inside the namespace
HOLDER_PID=""      # process holding the private mount namespace
CONTAINERD_PID=""
KUBELET_PID=""
PLUGIN_PID=""
KUBELET_N=0        # how many kubelets were started (each logs to its own file)
PLUGIN_N=0
PLUGIN_LOG=""
MODE=""            # the plugin's --registration mode ("" = the plugin's default)
CG_NAME=""         # cgroup root (in every hierarchy) for the kubelet's pods
MNT_NS=""          # the namespace's identity (/proc/PID/ns/mnt link)

# Runs a command inside the private mount namespace (for foreground commands).
ns() { nsenter -t "$HOLDER_PID" -m -n -- "$@"; }
# Runs a command in the private network namespace only (curl to the kubelet's ports).
net() { nsenter -t "$HOLDER_PID" -n -- "$@"; }
ctr_() { ns ctr --address /run/containerd/containerd.sock -n k8s.io "$@"; }

# Sends TERM, waits up to $2 seconds, then KILL. Only for PIDs this script started.
stop_pid() {
  local pid=$1 grace=${2:-10} i
  [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < grace * 10; i++)); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  if kill -0 "$pid" 2>/dev/null; then
    say "pid $pid did not stop on TERM, killing"
    kill -KILL "$pid" 2>/dev/null || true
  fi
  wait "$pid" 2>/dev/null || true
}

cgroup_mounts() { awk '$3 == "cgroup" || $3 == "cgroup2" { print $2 }' /proc/self/mounts; }

# PIDs of the processes in our cgroups (containers, their runc children).
cgroup_pids() {
  [[ -n $CG_NAME ]] || return 0
  local m
  for m in $(cgroup_mounts); do
    [[ -d $m/$CG_NAME ]] || continue
    find "$m/$CG_NAME" -name cgroup.procs -exec cat {} + 2>/dev/null
  done | sort -un
}

# PIDs of the processes left in our mount namespace (shims and whatever else we started).
ns_pids() {
  [[ -n $MNT_NS ]] || return 0
  local p
  for p in /proc/[0-9]*; do
    [[ ${p#/proc/} == "$HOLDER_PID" ]] && continue
    [[ $(readlink "$p/ns/mnt" 2>/dev/null) == "$MNT_NS" ]] && printf '%s\n' "${p#/proc/}"
  done
}

TORN_DOWN=0
# teardown [STATUS]: stop everything, remove cgroups; keep $ROOT (logs) if anything failed.
teardown() {
  local rc=${1:-0}
  ((TORN_DOWN)) && return 0
  TORN_DOWN=1
  set +e
  trap '' INT TERM
  say "tearing down"
  stop_pid "$KUBELET_PID" 15
  stop_pid "$PLUGIN_PID" 10
  # Containers: kill their processes (they live in our cgroups), then let containerd go.
  local pids
  pids=$(cgroup_pids)
  if [[ -n $pids ]]; then
    say "killing container processes: $(echo $pids)"
    kill -KILL $pids 2>/dev/null
  fi
  stop_pid "$CONTAINERD_PID" 15
  # Shims outlive containerd; anything else still in the namespace is ours too.
  pids=$(ns_pids)
  if [[ -n $pids ]]; then
    say "killing leftover processes in the namespace: $(echo $pids)"
    kill -KILL $pids 2>/dev/null
    sleep 0.5
  fi
  stop_pid "$HOLDER_PID" 5
  remove_cgroups
  if [[ -n $ROOT && -d $ROOT ]]; then
    if ((rc != 0 || FAILED > 0)) || [[ ${KDP_E2E_KEEP:-0} == 1 ]]; then
      # keep logs and configs, drop the bulky image store
      rm -rf "$NSROOT/var-lib/containerd" 2>/dev/null
      say "state and logs kept in $ROOT"
    else
      rm -rf "$ROOT"
    fi
  fi
  return 0
}

SUMMARY_DONE=0
summary() {
  echo
  ((${#NOTES[@]} == 0)) || printf 'NOTE  %s\n' "${NOTES[@]}"
  ((${#MEASURES[@]} == 0)) || printf 'MEASURE  %s\n' "${MEASURES[@]}"
  ((${#RESULTS[@]} == 0)) || printf '%s\n' "${RESULTS[@]}"
  echo "$PASSED passed, $FAILED failed"
  SUMMARY_DONE=1
}

on_exit() {
  local rc=$?
  teardown "$rc"
  if ((!SUMMARY_DONE)); then
    # setup broke or the run was interrupted: that counts as a failure
    FAILED=$((FAILED + 1))
    RESULTS+=("FAIL  run aborted (exit status $rc)")
    summary
    ((rc != 0)) || rc=1
  fi
  exit "$rc"
}
trap on_exit EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

remove_cgroups() {
  [[ -n $CG_NAME ]] || return 0
  local m d left pids
  for _ in 1 2 3 4 5 6 7 8 9 10; do
    left=0
    for m in $(cgroup_mounts); do
      [[ -d $m/$CG_NAME ]] || continue
      # deepest first
      while IFS= read -r d; do rmdir "$d" 2>/dev/null; done < <(find "$m/$CG_NAME" -depth -type d)
      [[ -d $m/$CG_NAME ]] && left=1
    done
    ((left)) || return 0
    pids=$(cgroup_pids)
    [[ -z $pids ]] || kill -KILL $pids 2>/dev/null
    sleep 0.5
  done
  say "warning: could not remove cgroup $CG_NAME in: $(for m in $(cgroup_mounts); do [[ -d $m/$CG_NAME ]] && echo "$m"; done)"
}

# ---------------------------------------------------------------------------------------------
# Setup
# ---------------------------------------------------------------------------------------------
setup_state() {
  ROOT=$(mktemp -d /tmp/kdp-e2e.XXXXXX)
  chmod 755 "$ROOT"
  NSROOT=$ROOT/ns
  mkdir -p "$NSROOT"/{run,var-lib,var-log,sysctl} "$ROOT"/{logs,manifests,images,devroot/net,volume-plugins}
  CG_NAME=kdp-e2e-$(basename "$ROOT" | cut -d. -f2)
  say "state directory $ROOT, cgroup /$CG_NAME"
  printf 'nameserver 127.0.0.1\n' >"$ROOT/resolv.conf"
}

# The kernel tunables the kubelet sets at start (unless protectKernelDefaults, which would make it
# refuse to start here): inside the namespace, regular files are bind-mounted over them, so the
# kubelet reads and writes those files and the host's values stay as they are.
KUBELET_SYSCTLS=(vm/overcommit_memory vm/panic_on_oom kernel/panic kernel/panic_on_oops
  kernel/keys/root_maxkeys kernel/keys/root_maxbytes)

start_namespace() {
  local binds="" s f
  for s in "${KUBELET_SYSCTLS[@]}"; do
    [[ -e /proc/sys/$s ]] || continue
    f=$NSROOT/sysctl/${s//\//.}
    cat "/proc/sys/$s" >"$f"
    binds+="mount --bind '$f' '/proc/sys/$s'; "
  done
  touch "$NSROOT/var-lib/.kdp-e2e" "$NSROOT/run/.kdp-e2e" "$NSROOT/var-log/.kdp-e2e"
  # unshare execs sh, which execs sleep: $! is the holder for the namespace's whole life.
  unshare -m -n --propagation private -- sh -euc "
    ip link set lo up
    mount --bind '$NSROOT/run' /run
    mount --bind '$NSROOT/var-lib' /var/lib
    mount --bind '$NSROOT/var-log' /var/log
    $binds
    touch '$ROOT/ns-ready'
    exec sleep 2147483647
  " >"$ROOT/logs/namespace.log" 2>&1 &
  HOLDER_PID=$!
  local i
  for ((i = 0; i < 50; i++)); do
    [[ -e $ROOT/ns-ready ]] && break
    kill -0 "$HOLDER_PID" 2>/dev/null || die "namespace setup failed: $(cat "$ROOT/logs/namespace.log")"
    sleep 0.1
  done
  [[ -e $ROOT/ns-ready ]] || die "namespace setup timed out"
  MNT_NS=$(readlink "/proc/$HOLDER_PID/ns/mnt")
  [[ $MNT_NS != "$(readlink /proc/self/ns/mnt)" ]] || die "no private mount namespace"
  # Never start anything unless the namespace really shows our directories.
  ns test -e /var/lib/.kdp-e2e -a -e /run/.kdp-e2e -a -e /var/log/.kdp-e2e ||
    die "bind mounts not visible in the namespace"
  say "private mount namespace $MNT_NS (holder pid $HOLDER_PID)"
}

setup_cgroups() {
  local m
  for m in $(cgroup_mounts); do
    mkdir -p "$m/$CG_NAME"
    if [[ -e $m/cpuset.cpus && -e $m/$CG_NAME/cpuset.cpus ]]; then
      cat "$m/cpuset.cpus" >"$m/$CG_NAME/cpuset.cpus"
      cat "$m/cpuset.mems" >"$m/$CG_NAME/cpuset.mems"
    fi
  done
}

build_images() {
  local pause
  pause=$(bash "$HERE/build-kubelet.sh" --pause | tail -1)
  [[ -x $pause ]] || die "no pause binary"
  python3 "$HERE/oci_image.py" --name "$PAUSE_IMAGE" --out "$ROOT/images/pause.tar" \
    --file "$pause=/pause:755" --entrypoint /pause >&2
  local bb=/bin/busybox
  [[ -x $bb ]] || bb=$(command -v busybox)
  local args=(--file "$bb=/bin/busybox:755" --dir /tmp:1777 --dir /dev --dir /proc --dir /sys --dir /etc)
  local applet
  for applet in sh stat sleep cat echo ls test true false grep; do args+=(--link "/bin/$applet=busybox"); done
  python3 "$HERE/oci_image.py" --name "$IMAGE" --out "$ROOT/images/busybox.tar" "${args[@]}" >&2
  if [[ -n $PLUGIN_IMAGE ]]; then
    cp "$PLUGIN_IMAGE" "$ROOT/images/plugin.tar"
    # What `kubectl apply -k` would create; the plugin's pod is made from its DaemonSet.
    "$KUBECTL" kustomize "$MANIFESTS" >"$ROOT/rendered.yaml" || die "kubectl kustomize $MANIFESTS failed"
  fi
}

start_containerd() {
  # Debian's CNI plugins: a bridge in the private network namespace, host-local addresses (kept
  # under the namespace's /var/lib), and the loopback plugin containerd runs for every sandbox.
  mkdir -p "$ROOT/cni/net.d"
  cat >"$ROOT/cni/net.d/10-kdp-e2e.conflist" <<EOF
{
  "cniVersion": "0.4.0",
  "name": "kdp-e2e",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "kdp0",
      "isGateway": true,
      "ipMasq": false,
      "ipam": {
        "type": "host-local",
        "ranges": [[{ "subnet": "$CNI_SUBNET" }]],
        "routes": [{ "dst": "0.0.0.0/0" }]
      }
    }
  ]
}
EOF
  cat >"$ROOT/containerd.toml" <<EOF
version = 2
root = "/var/lib/containerd"
state = "/run/containerd"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper"]

[grpc]
  address = "/run/containerd/containerd.sock"

[plugins]
  [plugins."io.containerd.grpc.v1.cri"]
    sandbox_image = "$PAUSE_IMAGE"
    # No CAP_SYS_RESOURCE in this VM: without this every sandbox fails with
    # "can't get final child's PID from pipe: EOF".
    restrict_oom_score_adj = true
    # Never load an AppArmor profile into the host's kernel.
    disable_apparmor = true
    enable_selinux = false
    stream_server_address = "127.0.0.1"
    stream_server_port = "0"
    [plugins."io.containerd.grpc.v1.cri".containerd]
      snapshotter = "overlayfs"
      default_runtime_name = "runc"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
        runtime_type = "io.containerd.runc.v2"
        [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
          SystemdCgroup = false
    [plugins."io.containerd.grpc.v1.cri".cni]
      bin_dir = "/usr/lib/cni"
      conf_dir = "$ROOT/cni/net.d"
  [plugins."io.containerd.internal.v1.opt"]
    path = "/var/lib/containerd/opt"
EOF
  # a simple command in the background (not a function), so $! is containerd itself: nsenter
  # execs it without forking when entering only a mount namespace
  nsenter -t "$HOLDER_PID" -m -n -- containerd --config "$ROOT/containerd.toml" \
    >"$ROOT/logs/containerd.log" 2>&1 &
  CONTAINERD_PID=$!
  local i
  for ((i = 0; i < 100; i++)); do
    kill -0 "$CONTAINERD_PID" 2>/dev/null || die "containerd exited: $(tail -5 "$ROOT/logs/containerd.log")"
    ctr_ version >/dev/null 2>&1 && break
    sleep 0.2
  done
  ctr_ version >/dev/null 2>&1 || die "containerd did not come up"
  say "containerd pid $CONTAINERD_PID"
  local t
  local tars=(pause busybox)
  [[ -z $PLUGIN_IMAGE ]] || tars+=(plugin)
  for t in "${tars[@]}"; do
    ctr_ images import "$ROOT/images/$t.tar" >>"$ROOT/logs/ctr.log" 2>&1 ||
      die "ctr images import $t failed: $(tail -3 "$ROOT/logs/ctr.log")"
  done
  local images
  images=$(ctr_ images ls -q)
  grep -qx "$IMAGE" <<<"$images" || die "image $IMAGE not named after import"
  grep -qx "$PAUSE_IMAGE" <<<"$images" || die "image $PAUSE_IMAGE not named after import"
  if [[ -n $PLUGIN_IMAGE ]]; then
    # The image as the rendered DaemonSet names it, as if pulled from its registry.
    local want imported
    want=$(python3 "$HERE/pod_from_daemonset.py" --image "$ROOT/rendered.yaml")
    imported=$(python3 -c 'import json, sys, tarfile
t = tarfile.open(sys.argv[1])
print(json.load(t.extractfile("index.json"))["manifests"][0]["annotations"]["io.containerd.image.name"])' "$ROOT/images/plugin.tar")
    if [[ $imported != "$want" ]]; then
      ctr_ images tag "$imported" "$want" >>"$ROOT/logs/ctr.log" 2>&1 || die "ctr images tag $imported $want failed"
    fi
    ctr_ images ls -q | grep -qx "$want" || die "image $want not present after import"
    say "plugin image $want (from $PLUGIN_IMAGE)"
  fi
}

write_kubelet_config() {
  cat >"$ROOT/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
staticPodPath: $ROOT/manifests
fileCheckFrequency: 5s
syncFrequency: 10s
address: 127.0.0.1
port: $KUBELET_PORT
readOnlyPort: $RO_PORT
healthzBindAddress: 127.0.0.1
healthzPort: $HEALTHZ_PORT
authentication:
  anonymous:
    enabled: true
  webhook:
    enabled: false
authorization:
  mode: AlwaysAllow
cgroupDriver: cgroupfs
cgroupRoot: /$CG_NAME
failSwapOn: false
makeIPTablesUtilChains: false
resolvConf: $ROOT/resolv.conf
enableControllerAttachDetach: false
evictionHard:
  memory.available: "1Mi"
  nodefs.available: "1%"
  nodefs.inodesFree: "1%"
  imagefs.available: "1%"
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
EOF
  # From 1.35 the kubelet refuses cgroup v1 hosts unless told otherwise; older ones reject the
  # field.
  if ((KUBELET_MINOR >= 35)); then
    echo "failCgroupV1: false" >>"$ROOT/kubelet.yaml"
  fi
}

start_kubelet() {
  KUBELET_N=$((KUBELET_N + 1))
  local logf=$ROOT/logs/kubelet-$KUBELET_N.log
  # --container-runtime went in 1.27 (remote is all there is); the sandbox image is the
  # runtime's business from 1.27 on, and the flag is gone later.
  local legacy=()
  if ((KUBELET_MINOR < 27)); then
    legacy=(--container-runtime=remote --pod-infra-container-image="$PAUSE_IMAGE")
  fi
  nsenter -t "$HOLDER_PID" -m -n -- "$KUBELET_BIN" \
    --config="$ROOT/kubelet.yaml" \
    --root-dir=/var/lib/kubelet \
    "${legacy[@]}" \
    --container-runtime-endpoint=unix:///run/containerd/containerd.sock \
    --hostname-override="$NODE" \
    --volume-plugin-dir="$ROOT/volume-plugins" \
    --v=2 >"$logf" 2>&1 &
  KUBELET_PID=$!
  local i
  for ((i = 0; i < 300; i++)); do
    kill -0 "$KUBELET_PID" 2>/dev/null || die "kubelet exited: $(tail -5 "$logf")"
    net curl -fsS "http://127.0.0.1:$HEALTHZ_PORT/healthz" >/dev/null 2>&1 &&
      net curl -fsS "http://127.0.0.1:$RO_PORT/pods" >/dev/null 2>&1 &&
      [[ -S $NSROOT/var-lib/kubelet/device-plugins/kubelet.sock ]] && break
    sleep 0.2
  done
  ((i < 300)) || die "kubelet did not come up: $(tail -5 "$logf")"
  say "kubelet #$KUBELET_N pid $KUBELET_PID (log $logf)"
}

stop_kubelet() {
  stop_pid "$KUBELET_PID" 15
  KUBELET_PID=""
}

# start_plugin [extra flags...]: a new plugin process with its own log file (in "pod" runs, a
# new plugin pod: see start_plugin_pod).
start_plugin() {
  [[ $MODE != pod ]] || { start_plugin_pod "$@"; return; }
  PLUGIN_N=$((PLUGIN_N + 1))
  PLUGIN_LOG=$ROOT/logs/plugin-$PLUGIN_N.log
  local resources
  resources=$(IFS=,; echo "${RESOURCES[*]}")
  local args=(--plugin-dir /var/lib/kubelet/device-plugins --resource "$resources" --count "$COUNT")
  [[ -z $MODE ]] || args+=(--registration "$MODE")
  args+=("$@")
  nsenter -t "$HOLDER_PID" -m -n -- env -u RUST_LOG "$PLUGIN_BIN" --log-level debug serve \
    "${args[@]}" >"$PLUGIN_LOG" 2>&1 &
  PLUGIN_PID=$!
  say "plugin #$PLUGIN_N pid $PLUGIN_PID (${args[*]}) log $PLUGIN_LOG"
}

stop_plugin() {
  [[ $MODE != pod ]] || { stop_plugin_pod; return; }
  stop_pid "$PLUGIN_PID" 10
  PLUGIN_PID=""
}

# start_plugin_pod [--dev-root DIR] [--run-as UID]: the plugin as a static pod made from the
# rendered DaemonSet's pod template (pod_from_daemonset.py), with the scenarios' resources and
# count as environment variables. PLUGIN_LOG is its container's log once it started.
start_plugin_pod() {
  PLUGIN_N=$((PLUGIN_N + 1))
  local resources
  resources=$(IFS=,; echo "${RESOURCES[*]}")
  local args=(--name "$PLUGIN_POD" --annotation "kdp-e2e/created=$$-plugin-$PLUGIN_N"
    --env "KDP_RESOURCES=$resources" --env "KDP_COUNT=$COUNT")
  while (($#)); do
    case $1 in
      --dev-root) args+=(--env "KDP_DEV_ROOT=$2" --host-dir "$2") ;;
      --run-as) args+=(--run-as "$2") ;;
      *) die "start_plugin_pod: unknown option $1" ;;
    esac
    shift 2
  done
  local manifest=$ROOT/logs/plugin-pod-$PLUGIN_N.json
  python3 "$HERE/pod_from_daemonset.py" "$ROOT/rendered.yaml" "${args[@]}" >"$manifest" ||
    die "pod_from_daemonset.py failed"
  cp "$manifest" "$ROOT/manifests/.$PLUGIN_POD.yaml"
  mv "$ROOT/manifests/.$PLUGIN_POD.yaml" "$ROOT/manifests/$PLUGIN_POD.yaml"
  PLUGIN_LOG=""
  local deadline=$((SECONDS + POD_TIMEOUT))
  while ((SECONDS < deadline)); do
    PLUGIN_LOG=$(pod_log_file "$PLUGIN_POD")
    [[ -z $PLUGIN_LOG ]] || break
    sleep 0.2
  done
  if [[ -z $PLUGIN_LOG ]]; then
    say "plugin pod #$PLUGIN_N did not start: $(pod_status "$PLUGIN_POD")"
    PLUGIN_LOG=$ROOT/logs/plugin-$PLUGIN_N.log
    return 0
  fi
  say "plugin pod #$PLUGIN_N ${args[*]:2} (manifest $manifest) log $PLUGIN_LOG"
}

# stop_plugin_pod: delete the plugin's pod (the kubelet stops it with SIGTERM) and keep its log.
# plugin_pod_pids: the plugin processes running in the pods' cgroups.
plugin_pod_pids() {
  local p
  for p in $(cgroup_pids); do
    [[ $(readlink "/proc/$p/exe" 2>/dev/null) == */kubelet-device-plugins ]] && echo "$p"
  done
}

stop_plugin_pod() {
  [[ -e $ROOT/manifests/$PLUGIN_POD.yaml ]] || return 0
  local pids deadline=$((SECONDS + 40))
  pids=$(plugin_pod_pids)
  delete_pods "$PLUGIN_POD"
  # Newer kubelets (1.37) drop a static pod from their pod list before its container has been
  # sent SIGTERM: the plugin's own exit is what says its shutdown is over.
  while [[ -n $pids ]] && ((SECONDS < deadline)); do
    local p alive=""
    for p in $pids; do [[ -e /proc/$p ]] && alive+="$p "; done
    pids=$alive
    [[ -z $pids ]] || sleep 0.2
  done
  [[ -z $pids ]] || say "warning: the plugin pod's process $pids still runs 40s after its pod was deleted"
  local copy=$ROOT/logs/plugin-$PLUGIN_N.log
  if [[ -n $PLUGIN_LOG && $PLUGIN_LOG != "$copy" ]]; then
    cp "$PLUGIN_LOG" "$copy" 2>/dev/null || say "the plugin pod's log $PLUGIN_LOG is gone already"
  fi
  PLUGIN_LOG=$copy
}

# measure_plugin_pod WHEN: a MEASURE line with the memory of the plugin in its pod: the process's
# RSS (anonymous and file-backed) and threads, and its container's memory cgroup (usage, and the
# working set that limits and evictions go by: usage less inactive file pages).
measure_plugin_pod() {
  local pid line
  pid=$(plugin_pod_pids | head -1)
  if [[ -z $pid ]]; then
    NOTES+=("[pod] $1: no plugin process found in the pods' cgroups to measure")
    return 0
  fi
  line=$(python3 - "$pid" <<'PY'
import sys
pid = sys.argv[1]
st = {}
for l in open(f"/proc/{pid}/status"):
    k, _, v = l.partition(":")
    st[k] = v.split()
mib = lambda kib: "%.1f MiB" % (kib / 1024)
out = "RSS %s (%s anonymous, %s file-backed), %s threads" % (
    mib(int(st["VmRSS"][0])), mib(int(st["RssAnon"][0])), mib(int(st["RssFile"][0])), st["Threads"][0])
for l in open(f"/proc/{pid}/cgroup"):
    hid, ctrls, path = l.rstrip("\n").split(":", 2)
    if "memory" in ctrls.split(","):      # cgroup v1
        base, usage, inactive = "/sys/fs/cgroup/memory" + path, "memory.usage_in_bytes", "total_inactive_file"
    elif hid == "0" and ctrls == "":      # cgroup v2
        base, usage, inactive = "/sys/fs/cgroup" + path, "memory.current", "inactive_file"
    else:
        continue
    try:
        used = int(open(f"{base}/{usage}").read())
        stat = dict(l.split() for l in open(f"{base}/memory.stat"))
        ws = used - int(stat.get(inactive, 0))
        out += "; container cgroup: usage %s, working set %s" % (mib(used / 1024), mib(ws / 1024))
    except OSError:
        pass
    break
print(out)
PY
  ) || return 0
  MEASURES+=("[pod] plugin memory, $1: $line")
  say "  plugin memory, $1: $line"
}

# pod_ready NAME: the pod's Ready condition ("True", "False", or "" if unknown).
pod_ready() {
  pods_json 2>/dev/null | python3 -c '
import json, sys
for p in json.load(sys.stdin).get("items") or []:
    if p["metadata"]["name"] == sys.argv[1]:
        for c in (p.get("status") or {}).get("conditions") or []:
            if c.get("type") == "Ready":
                print(c.get("status", ""))
' "$1-$NODE" || true
}

# wait_plugin_ready [TIMEOUT]: the plugin pod's readiness probe (/readyz over the pod network)
# passes: every resource registered and its first device list sent.
wait_plugin_ready() {
  local timeout=${1:-60} deadline
  deadline=$((SECONDS + timeout))
  while ((SECONDS < deadline)); do
    [[ $(pod_ready "$PLUGIN_POD") == True ]] && return 0
    sleep 0.5
  done
  say "  the plugin pod is not Ready after ${timeout}s: $(pod_status "$PLUGIN_POD")"
  return 1
}

# show_plugin_log: the plugin's last log lines, to see why a scenario failed.
show_plugin_log() {
  { tail -20 "$PLUGIN_LOG" 2>/dev/null || echo "(no log at $PLUGIN_LOG)"; } | sed 's/^/    plugin: /' >&2
}

# registrations RESOURCE: how many times the current plugin process logged a successful Register.
registrations() {
  local n
  n=$(grep -c "registered $DOMAIN/$1 " "$PLUGIN_LOG" 2>/dev/null) || true
  echo "${n:-0}"
}

# wait_registered MIN [TIMEOUT]: every resource registered at least MIN times by this plugin process.
wait_registered() {
  local min=$1 timeout=${2:-30} r i ok
  for ((i = 0; i < timeout * 5; i++)); do
    ok=1
    for r in "${RESOURCES[@]}"; do
      (($(registrations "$r") >= min)) || ok=0
    done
    ((ok)) && return 0
    [[ -n $PLUGIN_PID ]] && ! kill -0 "$PLUGIN_PID" 2>/dev/null && {
      say "plugin exited: $(tail -5 "$PLUGIN_LOG")"
      return 1
    }
    sleep 0.2
  done
  say "plugin did not register every resource $min time(s) within ${timeout}s"
  return 1
}

# check_registrations WHAT R=N...: after things settle, fail if any resource was registered more
# than once since the counts R=N were taken (one kubelet start needs one registration per resource;
# each extra one leaves the kubelet 1.20 with a second endpoint and ListAndWatch stream). In
# plugin-watcher mode, also fail if the plugin called Register on kubelet.sock at all.
check_registrations() {
  local what=$1 kv r n rc=0
  shift
  # Nothing signals "no more registrations are coming"; give late ones time to show.
  sleep 3
  for kv in "$@"; do
    r=${kv%%=*}
    n=$(($(registrations "$r") - ${kv#*=}))
    if ((n > 1)); then
      say "  plugin registered $r $n times for one $what (expected once)"
      rc=1
    fi
  done
  # The DaemonSet's "auto" picks the plugin watcher on this kubelet (plugins_registry/ exists).
  if [[ $MODE == plugin-watcher || $MODE == pod ]] && grep -q "with the kubelet in" "$PLUGIN_LOG"; then
    say "  plugin-watcher mode, yet the plugin called Register on kubelet.sock"
    rc=1
  fi
  return $rc
}

# check_no_leftover_sockets: after the plugin stopped, sockets under the kubelet's directory named
# like ours (kdp-*, and the temporary .kdp-* ones) are the plugin's leftovers, and fail the
# scenario. Only our names count: each kubelet release has sockets of its own there (1.37 adds
# pods-api/pods-api.sock).
check_no_leftover_sockets() {
  local left
  left=$(cd "$NSROOT/var-lib/kubelet" && find . -type s \( -name 'kdp-*' -o -name '.kdp-*' \) |
    sed 's|^\./||' | sort | tr '\n' ' ')
  if [[ -n $left ]]; then
    say "  the plugin left sockets behind after SIGTERM: $left"
    return 1
  fi
}

# ---------------------------------------------------------------------------------------------
# Pods
# ---------------------------------------------------------------------------------------------
# Each probe container prints, every 2 s, one line per device node and a "---" separator (and exits
# at once on TERM: as PID 1 it would otherwise ignore it):
#   /dev/kvm character special file a:e8 open=ok
#   /dev/net/tun absent
PROBE='report() {
  for d in /dev/kvm /dev/net/tun /dev/fuse; do
    if [ -e "$d" ]; then
      o=denied; (exec 3<>"$d") 2>/dev/null && o=ok
      echo "$d $(stat -c "%F %t:%T" "$d") open=$o"
    else
      echo "$d absent"
    fi
  done
  echo ---
}
trap "exit 0" TERM
while true; do report; sleep 2 & wait $!; done'

# create_pod NAME [RESOURCE...]: a static pod whose container requests one of each RESOURCE.
PODS_CREATED=0
create_pod() {
  PODS_CREATED=$((PODS_CREATED + 1))
  local name=$1
  shift
  local limits="" r
  for r in "$@"; do limits+="            $DOMAIN/$r: \"1\""$'\n'; done
  local resources=""
  [[ -z $limits ]] || resources="        resources:"$'\n'"          limits:"$'\n'"$limits"
  local script
  script=$(printf '%s' "$PROBE" | sed 's/^/            /')
  cat >"$ROOT/manifests/.$name.yaml" <<EOF
apiVersion: v1
kind: Pod
metadata:
  name: $name
  namespace: default
  annotations:
    # A static pod's UID is a hash of its manifest: a pod re-created from the same manifest after
    # being deleted gets the old UID, and the kubelet 1.20 then reports the old pod's final status
    # (Failed, exit 137) instead of running it. This makes every manifest unique.
    kdp-e2e/created: "$$-$PODS_CREATED"
spec:
  hostNetwork: true
  dnsPolicy: Default
  restartPolicy: Never
  terminationGracePeriodSeconds: 1
  containers:
      - name: probe
        image: $IMAGE
        imagePullPolicy: Never
        command:
          - /bin/sh
          - -c
          - |
$script
$resources
EOF
  mv "$ROOT/manifests/.$name.yaml" "$ROOT/manifests/$name.yaml" # the kubelet skips dot files
}

pods_json() { net curl -fsS --max-time 5 "http://127.0.0.1:$RO_PORT/pods"; }

# pod_status NAME: "phase|reason|message|container state|restarts|uid" of static pod NAME ("" if
# the kubelet does not know it)
pod_status() {
  pods_json 2>/dev/null | python3 -c '
import json, sys
name = sys.argv[1]
try:
    pods = json.load(sys.stdin).get("items") or []
except ValueError:
    sys.exit(0)
for p in pods:
    if p["metadata"]["name"] != name:
        continue
    st = p.get("status") or {}
    cs = (st.get("containerStatuses") or [{}])[0]
    state = cs.get("state") or {}
    if "running" in state:
        c = "running"
    elif "terminated" in state:
        c = "terminated:%s:%s" % (state["terminated"].get("exitCode"), state["terminated"].get("reason", ""))
    elif "waiting" in state:
        c = "waiting:%s" % state["waiting"].get("reason", "")
    else:
        c = "none"
    msg = (st.get("message") or "").replace("|", "/").replace("\n", " ")
    print("|".join([st.get("phase", ""), st.get("reason", ""), msg, c, str(cs.get("restartCount", 0)),
                    p["metadata"].get("uid", "")]))
' "$1-$NODE"
}

# wait_pod NAME PHASE [TIMEOUT]: until the pod's phase is PHASE (Running also needs a running
# container). Prints the last status.
wait_pod() {
  local name=$1 want=$2 timeout=${3:-$POD_TIMEOUT} st=""
  local deadline=$((SECONDS + timeout))
  while ((SECONDS < deadline)); do
    st=$(pod_status "$name")
    case $want in
      Running) [[ $st == Running\|*\|running\|* ]] && break ;;
      *) [[ $st == "$want|"* ]] && break ;;
    esac
    # a pod that ended cannot become Running
    [[ $want == Running && ($st == Failed\|* || $st == Succeeded\|*) ]] && break
    # the kubelet takes manifests within a second (inotify): unknown after 30s means rejected
    [[ -z $st ]] && ((SECONDS > deadline - timeout + 30)) && break
    sleep 0.5
  done
  printf '%s\n' "$st"
  [[ $want == Running && $st == Running\|*\|running\|* ]] && return 0
  [[ $want != Running && $st == "$want|"* ]] && return 0
  return 1
}

# delete_pods NAME...: remove the manifests and wait until the kubelet forgot the pods.
delete_pods() {
  local n left deadline=$((SECONDS + 60))
  for n in "$@"; do rm -f "$ROOT/manifests/$n.yaml"; done
  while ((SECONDS < deadline)); do
    left=0
    for n in "$@"; do [[ -z $(pod_status "$n") ]] || left=1; done
    ((left)) || return 0
    sleep 0.5
  done
  say "warning: pods still known to the kubelet after 60s: $*"
}

delete_all_pods() {
  local names=() f
  for f in "$ROOT"/manifests/*.yaml; do
    [[ -e $f && $(basename "$f") != "$PLUGIN_POD.yaml" ]] && names+=("$(basename "$f" .yaml)")
  done
  ((${#names[@]} == 0)) || delete_pods "${names[@]}"
}

# pod_log_file NAME: the log of the (only) container of the pod the kubelet now knows as NAME
pod_log_file() {
  local uid
  uid=$(pod_status "$1" | awk -F'|' '{ print $NF }')
  [[ -n $uid ]] || return 0
  { ls -1 "$NSROOT/var-log/pods/"*"_$1-${NODE}_$uid"/*/*.log 2>/dev/null || true; } | tail -1
}

# report_lines NAME: number of complete reports the pod's container logged so far
report_count() {
  local f
  f=$(pod_log_file "$1")
  [[ -n $f ]] || { echo 0; return; }
  grep -c ' ---$' "$f" || true
}

# last_report NAME [AFTER]: the last complete report (only if it is report number > AFTER)
last_report() {
  local name=$1 after=${2:-0} f deadline=$((SECONDS + 20))
  while ((SECONDS < deadline)); do
    f=$(pod_log_file "$name")
    if [[ -n $f ]] && (($(report_count "$name") > after)); then
      # CRI log lines: "<time> stdout F <text>"
      awk '{ sub(/^[^ ]+ [^ ]+ [^ ]+ /, "") } $0 == "---" { last = cur; cur = ""; next } { cur = cur $0 "\n" } END { printf "%s", last }' "$f"
      return 0
    fi
    sleep 0.5
  done
  return 1
}

host_devnum() { stat -L -c '%t:%T' "$1"; }

# expect_report NAME REPORT DEVICE... : each DEVICE (a resource name) present as a character
# device with the host's numbers and openable, every other one absent.
check_report() {
  local name=$1 report=$2
  shift 2
  local r want line ok=0
  for r in "${RESOURCES[@]}"; do
    line=$(grep "^${DEV[$r]} " <<<"$report" || true)
    if [[ " $* " == *" $r "* ]]; then
      want="${DEV[$r]} character special file ${NUM[$r]} open=ok"
    else
      want="${DEV[$r]} absent"
    fi
    if [[ $line != "$want" ]]; then
      say "  $name: expected '$want', saw '${line:-nothing}'"
      ok=1
    fi
  done
  ((ok)) || say "  $name: $(tr '\n' ';' <<<"$report" | sed 's/;$//; s/;/; /g')"
  return $ok
}

# pod_sees NAME RESOURCE...: the pod is running and sees exactly these devices.
pod_sees() {
  local name=$1 st report
  shift
  if ! st=$(wait_pod "$name" Running); then
    say "  $name: not running: ${st:-unknown to the kubelet}"
    return 1
  fi
  if ! report=$(last_report "$name"); then
    say "  $name: no report in its log"
    return 1
  fi
  check_report "$name" "$report" "$@"
}

# pod_refused NAME: the pod failed admission with the kubelet's UnexpectedAdmissionError.
pod_refused() {
  local st
  st=$(wait_pod "$1" Failed 60) || true
  say "  $1: ${st:-unknown to the kubelet}"
  [[ $st == "Failed|UnexpectedAdmissionError|"* ]]
}

# The kubelet's device manager checkpoint: healthy devices it knows per resource.
registered_devices() {
  python3 -c '
import json, sys
try:
    d = json.load(open(sys.argv[1]))
except (OSError, ValueError):
    print(-1); sys.exit(0)
print(len(((d.get("Data") or {}).get("RegisteredDevices") or {}).get(sys.argv[2]) or []))
' "$NSROOT/var-lib/kubelet/device-plugins/kubelet_internal_checkpoint" "$DOMAIN/$1"
}

# wait_devices RESOURCE N [TIMEOUT]: until the kubelet's checkpoint lists N healthy devices.
wait_devices() {
  local r=$1 n=$2 timeout=${3:-30} i
  for ((i = 0; i < timeout * 5; i++)); do
    (($(registered_devices "$r") == n)) && return 0
    sleep 0.2
  done
  say "  kubelet checkpoint lists $(registered_devices "$r") healthy $r device(s), expected $n"
  return 1
}

# ---------------------------------------------------------------------------------------------
# Scenarios
# ---------------------------------------------------------------------------------------------
run_scenario() {
  local title=${MODE:+[$MODE] }$1 rc=0 t0=$SECONDS
  shift
  say "=== $title"
  "$@" || rc=$?
  if ((rc == 0)); then
    PASSED=$((PASSED + 1))
    RESULTS+=("PASS  $title ($((SECONDS - t0))s)")
    echo "PASS  $title"
  else
    FAILED=$((FAILED + 1))
    RESULTS+=("FAIL  $title ($((SECONDS - t0))s)")
    echo "FAIL  $title"
  fi
  delete_all_pods
}

# 1. A pod requesting one device sees it, with the host's numbers, and no other.
scenario_device_visible() {
  local r=$1
  create_pod "visible-$r" "$r"
  pod_sees "visible-$r" "$r"
}

# 2. A pod requesting nothing sees none of the nodes.
scenario_no_request() {
  create_pod none
  pod_sees none
}

# 3. COUNT+1 pods against --count COUNT: COUNT run, the last fails admission.
scenario_capacity() {
  local i ok=0 names=()
  for ((i = 1; i <= COUNT; i++)); do
    create_pod "share-$i" kvm
    names+=("share-$i")
  done
  for ((i = 1; i <= COUNT; i++)); do pod_sees "share-$i" kvm || ok=1; done
  create_pod "share-extra" kvm
  pod_refused share-extra || ok=1
  # the running ones are unaffected
  for ((i = 1; i <= COUNT; i++)); do
    [[ $(pod_status "share-$i") == Running\|* ]] || { say "  share-$i no longer running"; ok=1; }
  done
  return $ok
}

# 4. The kubelet restarts, the plugin keeps running: it registers again by itself, a pod from
#    before keeps its device and a new pod gets one.
# measure_device_gap LOG: for each resource, the time from the kubelet's first log line to its
# device manager registering our endpoint (a "Registered endpoint" or "Registered client" line
# naming our socket): the
# window in which a restarted kubelet knows no devices of ours.
measure_device_gap() {
  local line
  line=$(python3 - "$1" "${RESOURCES[@]}" <<'PY'
import re, sys
from datetime import datetime
log, resources = sys.argv[1], sys.argv[2:]
stamp = re.compile(r"^[IWEF](\d{4} \d{2}:\d{2}:\d{2}\.\d{6})")
first, manager, seen = None, None, {}
for text in open(log, errors="replace"):
    m = stamp.match(text)
    if not m:
        continue
    t = datetime.strptime(m.group(1), "%m%d %H:%M:%S.%f")
    first = first or t
    # The device manager serving kubelet.sock: from here on, a plugin can be registered.
    if manager is None and "Starting Device Plugin manager" in text:
        manager = t
    # "Registered endpoint" up to some release, "Registered client" in 1.37.
    if "Registered endpoint" in text or "Registered client" in text:
        for r in resources:
            if f"kdp-{r}.sock" in text and r not in seen:
                seen[r] = t
def gap(r, since):
    return f"{(seen[r] - since).total_seconds() * 1000:.0f} ms" if r in seen and since else "never"
print("; ".join(f"{r} {gap(r, first)} after the kubelet started, {gap(r, manager)} after its device manager did" for r in resources))
PY
  )
  MEASURES+=("[$MODE] kubelet restart, our endpoint registered: $line")
  say "  our endpoint registered: $line"
}

scenario_kubelet_restart() {
  local ok=0 before r i
  local -A regs
  create_pod kr-before kvm
  pod_sees kr-before kvm || ok=1
  for r in "${RESOURCES[@]}"; do regs[$r]=$(registrations "$r"); done
  say "  restarting the kubelet (the plugin${PLUGIN_PID:+, pid $PLUGIN_PID,} keeps running)"
  stop_kubelet
  start_kubelet
  for r in "${RESOURCES[@]}"; do
    for ((i = 0; i < 150; i++)); do
      (($(registrations "$r") > ${regs[$r]})) && break
      sleep 0.2
    done
    if (($(registrations "$r") > ${regs[$r]})); then
      say "  plugin registered $r again"
    else
      say "  plugin did not register $r again within 30s"
      ok=1
    fi
  done
  ((ok == 0)) || show_plugin_log
  local counts=()
  for r in "${RESOURCES[@]}"; do counts+=("$r=${regs[$r]}"); done
  check_registrations "kubelet restart" "${counts[@]}" || ok=1
  measure_device_gap "$ROOT/logs/kubelet-$KUBELET_N.log"
  # the old pod: still running, same container, still sees its device
  before=$(report_count kr-before)
  local st
  st=$(wait_pod kr-before Running 30) || true
  if [[ $st != Running\|*\|running\|0\|* ]]; then
    say "  kr-before after the restart: $st"
    ok=1
  elif ! check_report kr-before "$(last_report kr-before "$before")" kvm; then
    ok=1
  fi
  create_pod kr-after kvm
  pod_sees kr-after kvm || ok=1
  if [[ $MODE == pod ]]; then
    measure_plugin_pod "after a kubelet restart"
    # The new kubelet probes the same container: Ready again, never restarted by liveness.
    wait_plugin_ready 60 || ok=1
    st=$(pod_status "$PLUGIN_POD")
    [[ $st == Running\|*\|running\|0\|* ]] || { say "  plugin pod after the kubelet restart: $st"; ok=1; }
  fi
  return $ok
}

# 5. The plugin restarts, the kubelet keeps running: running pods keep their devices, new pods
#    get theirs.
scenario_plugin_restart() {
  local ok=0 before st
  create_pod pr-before kvm tun fuse
  pod_sees pr-before kvm tun fuse || ok=1
  say "  restarting the plugin (kubelet pid $KUBELET_PID keeps running)"
  stop_plugin
  check_no_leftover_sockets || ok=1
  start_plugin
  wait_registered 1 || ok=1
  check_registrations "plugin start" kvm=0 tun=0 fuse=0 || ok=1
  before=$(report_count pr-before)
  st=$(wait_pod pr-before Running 30) || true
  if [[ $st != Running\|*\|running\|0\|* ]]; then
    say "  pr-before after the restart: $st"
    ok=1
  elif ! check_report pr-before "$(last_report pr-before "$before")" kvm tun fuse; then
    ok=1
  fi
  create_pod pr-after kvm tun fuse
  pod_sees pr-after kvm tun fuse || ok=1
  [[ $MODE != pod ]] || wait_plugin_ready || ok=1
  return $ok
}

# 7. (pod runs) The one privilege the DaemonSet keeps, UID 0, is needed: the same pod with
#    runAsUser/runAsGroup 65534 is refused by the kubelet's root-owned directories ("Permission
#    denied"), registers nothing and never becomes Ready. Then the real pod comes back.
scenario_needs_root() {
  local ok=0 i r
  stop_plugin
  start_plugin --run-as 65534
  for ((i = 0; i < 150; i++)); do
    grep -q "Permission denied" "$PLUGIN_LOG" 2>/dev/null && break
    sleep 0.2
  done
  if grep -q "Permission denied" "$PLUGIN_LOG" 2>/dev/null; then
    say "  as UID 65534: $(grep -m1 "Permission denied" "$PLUGIN_LOG" | sed 's/^[^ ]* [^ ]* [^ ]* //')"
  else
    say "  as UID 65534 the plugin logged no \"Permission denied\" within 30s"
    ok=1
  fi
  for r in "${RESOURCES[@]}"; do
    (($(registrations "$r") == 0)) || { say "  as UID 65534 the plugin registered $r"; ok=1; }
  done
  [[ $(pod_ready "$PLUGIN_POD") != True ]] || { say "  as UID 65534 the plugin pod is Ready"; ok=1; }
  ((ok == 0)) || show_plugin_log
  stop_plugin
  start_plugin
  wait_registered 1 || ok=1
  wait_plugin_ready || ok=1
  return $ok
}

# 6. With --dev-root pointing at a test directory of device nodes: a node removed makes the
#    kubelet refuse new pods for that resource; once it is back, a new pod is admitted and sees it.
scenario_node_removed() {
  local ok=0 r
  for r in "${RESOURCES[@]}"; do make_test_node "$r"; done
  say "  restarting the plugin with --dev-root $ROOT/devroot"
  stop_plugin
  start_plugin --dev-root "$ROOT/devroot"
  wait_registered 1 || return 1
  wait_devices kvm "$COUNT" || ok=1
  create_pod rm-baseline kvm
  pod_sees rm-baseline kvm || ok=1
  delete_pods rm-baseline

  say "  removing $ROOT/devroot/kvm"
  rm -f "$ROOT/devroot/kvm"
  wait_devices kvm 0 || ok=1
  create_pod rm-gone kvm
  pod_refused rm-gone || ok=1
  # the other resources are unaffected
  create_pod rm-other tun
  pod_sees rm-other tun || ok=1
  delete_pods rm-gone rm-other

  say "  restoring $ROOT/devroot/kvm"
  make_test_node kvm
  wait_devices kvm "$COUNT" || ok=1
  create_pod rm-back kvm
  pod_sees rm-back kvm || ok=1
  return $ok
}

# a copy of the host's node under the test dev root: same type, numbers and mode
make_test_node() {
  local r=$1 host=${DEV[$1]} dst=$ROOT/devroot/${REL[$1]}
  local maj min
  maj=$((16#$(stat -L -c %t "$host")))
  min=$((16#$(stat -L -c %T "$host")))
  mkdir -p "$(dirname "$dst")"
  rm -f "$dst"
  mknod -m "$(stat -L -c %a "$host")" "$dst.tmp" c "$maj" "$min"
  mv "$dst.tmp" "$dst"
}

run_scenarios() {
  local r
  for r in "${RESOURCES[@]}"; do
    run_scenario "1. pod requesting $r sees ${DEV[$r]} ${NUM[$r]}" scenario_device_visible "$r"
  done
  run_scenario "2. pod requesting nothing sees no device node" scenario_no_request
  run_scenario "3. $((COUNT + 1)) pods against --count $COUNT: $COUNT run, 1 UnexpectedAdmissionError" scenario_capacity
  run_scenario "4. kubelet restart: plugin registers again, pods keep/get devices" scenario_kubelet_restart
  run_scenario "5. plugin restart: running pods keep devices, new pods get them" scenario_plugin_restart
  run_scenario "6. device node removed from --dev-root: refused, then admitted when back" scenario_node_removed
  [[ $MODE != pod ]] ||
    run_scenario "7. the same pod without UID 0 cannot use the kubelet's directories, registers nothing" scenario_needs_root
}

# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------
main() {
  local t0=$SECONDS r
  [[ $(id -u) -eq 0 ]] || die "run as root"
  [[ -x $PLUGIN_BIN ]] || die "PLUGIN_BIN=$PLUGIN_BIN is not executable (build the plugin first)"
  PLUGIN_BIN=$(readlink -f "$PLUGIN_BIN")
  install_packages
  for r in "${RESOURCES[@]}"; do
    [[ -c ${DEV[$r]} ]] || die "this machine has no ${DEV[$r]}"
  done
  declare -gA NUM
  for r in "${RESOURCES[@]}"; do NUM[$r]=$(host_devnum "${DEV[$r]}"); done
  KUBELET_BIN=$(bash "$HERE/build-kubelet.sh" | tail -1)
  [[ -x $KUBELET_BIN ]] || die "no kubelet binary"
  local version
  version=$("$KUBELET_BIN" --version 2>/dev/null || true)
  [[ $version =~ v1\.([0-9]+)\. ]] || die "cannot tell the kubelet's version from \"$version\""
  KUBELET_MINOR=${BASH_REMATCH[1]}
  say "kubelet $KUBELET_BIN ($version), plugin $PLUGIN_BIN"

  setup_state
  build_images
  start_namespace
  setup_cgroups
  start_containerd
  write_kubelet_config
  start_kubelet
  say "setup done in $((SECONDS - t0))s"

  # Registration modes: every scenario runs once per mode, against the same kubelet.
  local help modes
  help=$("$PLUGIN_BIN" serve --help 2>&1 || true)
  if [[ $help == *--registration* ]]; then
    modes="kubelet-socket plugin-watcher"
  else
    modes="" # a plugin without the flag: kubelet.sock only
  fi
  [[ -z $PLUGIN_IMAGE ]] || modes+=" pod"
  modes=${KDP_E2E_REGISTRATION:-$modes}
  if [[ " $modes " == *" pod "* && -z $PLUGIN_IMAGE ]]; then
    die "the pod runs need PLUGIN_IMAGE (integration/build-image.sh)"
  fi
  [[ -n $PLUGIN_IMAGE && " $modes " != *" pod "* ]] && NOTES+=("PLUGIN_IMAGE given, but no pod run in KDP_E2E_REGISTRATION=$modes")
  for MODE in ${modes:-""}; do
    [[ -z $MODE ]] || say "##### plugin run: $MODE"
    # whatever ran the plugin before, process or pod
    stop_pid "$PLUGIN_PID" 10
    PLUGIN_PID=""
    stop_plugin_pod
    start_plugin
    local started=1
    wait_registered 1 || started=0
    if ((started)) && [[ $MODE == pod ]]; then
      wait_plugin_ready || started=0
      ((started == 0)) || measure_plugin_pod "started, idle"
      grep -q "registering through the kubelet's plugin watcher" "$PLUGIN_LOG" ||
        { say "the DaemonSet's registration \"auto\" did not pick the plugin watcher"; started=0; }
    fi
    if ((!started)); then
      FAILED=$((FAILED + 1))
      RESULTS+=("FAIL  ${MODE:+[$MODE] }plugin registers its resources")
      echo "FAIL  ${MODE:+[$MODE] }plugin registers its resources"
      show_plugin_log
      continue
    fi
    run_scenarios
  done

  # Anything the plugin logged at WARN or ERROR, for the record.
  if grep -hE ' (WARN|ERROR) ' "$ROOT"/logs/plugin-*.log >/dev/null 2>&1; then
    say "plugin warnings/errors:"
    grep -hE ' (WARN|ERROR) ' "$ROOT"/logs/plugin-*.log | head -30 | sed 's/^/    /' >&2
  fi
  say "scenarios done after $((SECONDS - t0))s"
  teardown "$((FAILED > 0))"
  say "total $((SECONDS - t0))s"
  summary
  ((FAILED == 0))
}

main "$@"
