"""The node under test, driven by the pytest process: a private mount and network namespace that
holds a containerd and a kubelet, with the pods' cgroups, the images and the static-pod directory.

e2e.sh installs packages and finds or builds the binaries (shell is natural there); everything
that starts, stops, watches or tears down the node's processes is here.

Inside the namespace /run, /var/lib and /var/log are bind mounts of directories under the state
root, so the host's /var/lib/kubelet, /run/containerd and /var/log/pods stay untouched; the kernel
tunables the kubelet sets at start are regular files bind-mounted over /proc/sys/...; pods that are
not hostNetwork get addresses from Debian's CNI plugins on a bridge that exists only there.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import tarfile
import tempfile
import time
from pathlib import Path

from . import workloads
from .pods import Pod
from .wait import wait_for, WaitTimeout

HERE = Path(__file__).resolve().parent.parent
NODE_NAME = "kdp-e2e"  # --hostname-override: static pods are named <name>-kdp-e2e
PAUSE_IMAGE = "k8s.gcr.io/pause:3.2"  # kubelet 1.20's default sandbox image
BUSYBOX_IMAGE = "localhost/kdp-busybox:e2e"
CNI_SUBNET = "10.88.{index}.0/24"  # each node of a cluster has its own
# The kernel tunables the kubelet writes at start (unless protectKernelDefaults, which would make
# it refuse to start here).
KUBELET_SYSCTLS = [
    "vm/overcommit_memory", "vm/panic_on_oom", "kernel/panic", "kernel/panic_on_oops",
    "kernel/keys/root_maxkeys", "kernel/keys/root_maxbytes",
]


class SetupError(Exception):
    """The node could not be brought up: no scenario can run."""


@dataclasses.dataclass(frozen=True)
class Settings:
    """What e2e.sh hands over, through the environment."""

    kubelet: Path
    kubelet_minor: int
    pause: Path
    containerd_dir: Path | None  # bin/containerd, bin/ctr, shim; None: Debian's on PATH
    plugin_bin: Path
    plugin_image: Path | None
    manifests: Path
    kubectl: str
    helm: str
    port_base: int
    keep: bool
    pod_timeout: float
    control_plane: Path | None = None  # kube-apiserver, -controller-manager, -scheduler
    etcd: Path | None = None

    @classmethod
    def from_env(cls) -> "Settings":
        env = os.environ
        try:
            kubelet = Path(env["KDP_E2E_KUBELET"])
            pause = Path(env["KDP_E2E_PAUSE"])
            minor = int(env["KDP_E2E_KUBELET_MINOR"])
        except (KeyError, ValueError) as e:
            raise SetupError(f"run the suite through integration/e2e.sh ({e!r} not set)") from e
        ctrd = env.get("KDP_E2E_CONTAINERD_DIR") or None
        image = env.get("PLUGIN_IMAGE") or None
        return cls(
            kubelet=kubelet,
            kubelet_minor=minor,
            pause=pause,
            containerd_dir=Path(ctrd) if ctrd else None,
            plugin_bin=Path(env["PLUGIN_BIN"]).resolve(),
            plugin_image=Path(image) if image else None,
            manifests=Path(env.get("KDP_E2E_MANIFESTS") or HERE.parent / "manifests"),
            kubectl=env.get("KUBECTL") or "kubectl",
            helm=env.get("HELM") or "helm",
            port_base=int(env.get("KDP_E2E_PORT_BASE") or 20200),
            keep=env.get("KDP_E2E_KEEP") == "1",
            pod_timeout=float(env.get("KDP_E2E_POD_TIMEOUT") or 90),
            control_plane=Path(env["KDP_E2E_CONTROL_PLANE"]) if env.get("KDP_E2E_CONTROL_PLANE") else None,
            etcd=Path(env["KDP_E2E_ETCD"]) if env.get("KDP_E2E_ETCD") else None,
        )


class Process:
    """A process the suite started: stopped by PID with TERM, then KILL after a grace period."""

    def __init__(self, name: str, popen: subprocess.Popen, log: Path):
        self.name, self.popen, self.log = name, popen, log

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, grace: float = 10, sig: int = signal.SIGTERM) -> None:
        if not self.alive():
            return
        self.popen.send_signal(sig)
        try:
            self.popen.wait(grace)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(10)

    def tail(self, lines: int = 5) -> str:
        try:
            return "".join(self.log.read_text(errors="replace").splitlines(True)[-lines:])
        except OSError:
            return f"(no log at {self.log})"


def _cgroup_mounts() -> list[Path]:
    out = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        fields = line.split()
        if fields[2] in ("cgroup", "cgroup2"):
            out.append(Path(fields[1]))
    return out


class Node:
    """One node: create with `Node(settings)`, then `up()`; `down()` always, pass or fail."""

    def __init__(self, settings: Settings, name: str = NODE_NAME, net_of: "Node | None" = None,
                 index: int = 0):
        """`name`: the Node's name. A second node of a cluster shares the first one's network
        namespace (`net_of`: the API server listens there) with a mount namespace, containerd,
        kubelet and pod bridge of its own; `index` tells its bridge and pod subnet apart."""
        self.settings = settings
        self.name, self.net_of, self.index = name, net_of, index
        self.root = Path(tempfile.mkdtemp(prefix="kdp-e2e."))
        self.root.chmod(0o755)
        self.nsroot = self.root / "ns"
        self.logs = self.root / "logs"
        self.manifests = self.root / "manifests"
        self.devroot = self.root / "devroot"
        for d in ("run", "var-lib", "var-log", "sysctl"):
            (self.nsroot / d).mkdir(parents=True)
        for d in (self.logs, self.manifests, self.root / "images", self.devroot / "net",
                  self.root / "volume-plugins", self.root / "cni/net.d"):
            d.mkdir(parents=True)
        self.cgroup = "kdp-e2e-" + self.root.name.split(".", 1)[1]
        self.kubelet_port = settings.port_base + 50
        self.ro_port = settings.port_base + 55
        self.healthz_port = settings.port_base + 48
        self.holder: Process | None = None
        self.mnt_ns = ""
        self.containerd: Process | None = None
        self.kubelet: Process | None = None
        self.kubelet_starts = 0
        # (kubeconfig, node IP) when the kubelet registers with a control plane (cluster.py)
        self.cluster_kubelet: tuple[Path, str] | None = None
        self.containerd_starts = 0
        self.failed = False

    # --- paths as the host sees them -------------------------------------------------------
    @property
    def kubelet_dir(self) -> Path:
        return self.nsroot / "var-lib/kubelet"

    @property
    def device_plugins_dir(self) -> Path:
        return self.kubelet_dir / "device-plugins"

    @property
    def cdi_dir(self) -> Path:
        """Where containerd reads CDI specs in the namespace (/var/run/cdi, that is /run/cdi)."""
        return self.nsroot / "run/cdi"

    @property
    def containerd_major(self) -> int:
        return 1 if self.settings.containerd_dir is None else 2

    def kubelet_log(self, n: int | None = None) -> Path:
        return self.logs / f"kubelet-{n or self.kubelet_starts}.log"

    # --- running things inside ---------------------------------------------------------------
    def _enter(self, net_only: bool = False) -> list[str]:
        assert self.holder is not None
        return ["nsenter", "-t", str(self.holder.pid), *(["-n"] if net_only else ["-m", "-n"]), "--"]

    def run(self, *args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
        """A foreground command inside the namespace."""
        return subprocess.run([*self._enter(), *args], capture_output=True, text=True,
                              timeout=timeout, check=check)

    def spawn(self, name: str, args: list[str], log: Path, env: dict | None = None) -> Process:
        """A background process inside the namespace (nsenter execs it: its PID is the process)."""
        f = open(log, "ab")
        try:
            popen = subprocess.Popen([*self._enter(), *args], stdout=f, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=env)
        finally:
            f.close()
        return Process(name, popen, log)

    def ctr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        ctr = "ctr" if self.settings.containerd_dir is None else str(self.settings.containerd_dir / "bin/ctr")
        return self.run(ctr, "--address", "/run/containerd/containerd.sock", "-n", "k8s.io", *args,
                        timeout=timeout, check=False)

    def http_get(self, port: int, path: str, timeout: float = 5) -> str | None:
        """GET on the namespace's loopback; None when nothing answers or the answer is an error."""
        r = subprocess.run([*self._enter(net_only=True), "curl", "-fsS", "--max-time", str(timeout),
                            f"http://127.0.0.1:{port}{path}"], capture_output=True, text=True,
                           timeout=timeout + 5)
        return r.stdout if r.returncode == 0 else None

    # --- bring-up ------------------------------------------------------------------------------
    def up(self) -> None:
        self.build_images()
        self.start_namespace()
        self.setup_cgroups()
        self.start_containerd()
        self.import_images()
        self.write_kubelet_config()
        self.start_kubelet()

    def build_images(self) -> None:
        images = self.root / "images"
        _check([os.environ.get("PYTHON", "python3"), str(HERE / "oci_image.py"), "--name", PAUSE_IMAGE,
                "--out", str(images / "pause.tar"), "--file", f"{self.settings.pause}=/pause:755",
                "--entrypoint", "/pause"], "the pause image")
        bb = shutil.which("busybox") or "/bin/busybox"
        args = ["--file", f"{bb}=/bin/busybox:755", "--dir", "/tmp:1777"]
        for d in ("/dev", "/proc", "/sys", "/etc"):
            args += ["--dir", d]
        for applet in ("sh", "stat", "sleep", "cat", "echo", "ls", "test", "true", "false", "grep",
                       "nc", "mkfifo", "seq"):
            args += ["--link", f"/bin/{applet}=busybox"]
        # The real workloads (workloads.py), beside busybox: one image for every test pod.
        try:
            built = workloads.build(self.root / "workloads")
        except workloads.BuildError as e:
            raise SetupError(str(e)) from None
        for program, binary in built.items():
            args += ["--file", f"{binary}=/bin/{program}:755"]
        _check([os.environ.get("PYTHON", "python3"), str(HERE / "oci_image.py"), "--name", BUSYBOX_IMAGE,
                "--out", str(images / "busybox.tar"), *args], "the busybox image")
        if self.settings.plugin_image:
            shutil.copy(self.settings.plugin_image, images / "plugin.tar")
            rendered = subprocess.run([self.settings.kubectl, "kustomize", str(self.settings.manifests)],
                                      capture_output=True, text=True)
            if rendered.returncode != 0:
                raise SetupError(f"kubectl kustomize {self.settings.manifests}: {rendered.stderr}")
            (self.root / "rendered.yaml").write_text(rendered.stdout)

    def start_namespace(self) -> None:
        binds = ""
        for s in KUBELET_SYSCTLS:
            src = Path("/proc/sys") / s
            if not src.exists():
                continue
            f = self.nsroot / "sysctl" / s.replace("/", ".")
            f.write_text(src.read_text())
            binds += f"mount --bind '{f}' '{src}'; "
        for d in ("var-lib", "run", "var-log"):
            (self.nsroot / d / ".kdp-e2e").touch()
        ready = self.root / "ns-ready"
        script = (
            "ip link set lo up; "
            f"mount --bind '{self.nsroot}/run' /run; "
            f"mount --bind '{self.nsroot}/var-lib' /var/lib; "
            f"mount --bind '{self.nsroot}/var-log' /var/log; "
            f"{binds}"
            f"touch '{ready}'; exec sleep 2147483647"
        )
        log = self.logs / "namespace.log"
        if self.net_of is None:
            unshare = ["unshare", "-m", "-n"]
        else:
            assert self.net_of.holder is not None
            unshare = ["nsenter", "-t", str(self.net_of.holder.pid), "-n", "--", "unshare", "-m"]
        with open(log, "wb") as f:
            popen = subprocess.Popen([*unshare, "--propagation", "private", "--",
                                      "sh", "-euc", script], stdout=f, stderr=subprocess.STDOUT)
        self.holder = Process("namespace", popen, log)
        wait_for(lambda: ready.exists() or not self.holder.alive(), 5, "the namespace to be set up")
        if not ready.exists():
            raise SetupError(f"namespace setup failed: {self.holder.tail()}")
        self.mnt_ns = os.readlink(f"/proc/{self.holder.pid}/ns/mnt")
        if self.mnt_ns == os.readlink("/proc/self/ns/mnt"):
            raise SetupError("no private mount namespace")
        # Never start anything unless the namespace really shows our directories.
        if self.run("test", "-e", "/var/lib/.kdp-e2e", "-a", "-e", "/run/.kdp-e2e", "-a",
                    "-e", "/var/log/.kdp-e2e", check=False).returncode != 0:
            raise SetupError("bind mounts not visible in the namespace")

    def setup_cgroups(self) -> None:
        for m in _cgroup_mounts():
            d = m / self.cgroup
            d.mkdir(exist_ok=True)
            if (m / "cpuset.cpus").exists() and (d / "cpuset.cpus").exists():
                (d / "cpuset.cpus").write_text((m / "cpuset.cpus").read_text())
                (d / "cpuset.mems").write_text((m / "cpuset.mems").read_text())

    def _write_cni(self) -> Path:
        conf = self.root / "cni/net.d"
        (conf / "10-kdp-e2e.conflist").write_text(json.dumps({
            "cniVersion": "0.4.0",
            "name": "kdp-e2e",
            "plugins": [{
                "type": "bridge", "bridge": f"kdp{self.index}", "isGateway": True, "ipMasq": False,
                "ipam": {"type": "host-local", "ranges": [[{"subnet": CNI_SUBNET.format(index=self.index)}]],
                         "routes": [{"dst": "0.0.0.0/0"}]},
            }],
        }, indent=2))
        return conf

    def _containerd_config(self) -> str:
        conf = self._write_cni()
        if self.containerd_major == 1:
            return CONTAINERD_1_CONFIG.format(pause=PAUSE_IMAGE, cni_conf=conf)
        return CONTAINERD_2_CONFIG.format(pause=PAUSE_IMAGE, cni_conf=conf)

    def start_containerd(self) -> None:
        self.containerd_starts += 1
        config = self.root / "containerd.toml"
        config.write_text(self._containerd_config())
        env = dict(os.environ)
        binary = "containerd"
        if self.settings.containerd_dir is not None:
            bindir = self.settings.containerd_dir / "bin"
            binary = str(bindir / "containerd")
            # containerd finds its shim on PATH
            env["PATH"] = f"{bindir}:{env.get('PATH', '')}"
        self.containerd = self.spawn("containerd", [binary, "--config", str(config)],
                                     self.logs / f"containerd-{self.containerd_starts}.log", env=env)

        def answers() -> bool:
            if not self.containerd.alive():
                raise SetupError(f"containerd exited: {self.containerd.tail()}")
            return self.ctr("version", timeout=10).returncode == 0

        try:
            wait_for(answers, 20, "containerd to answer")
        except WaitTimeout as e:
            raise SetupError(str(e)) from e

    def import_images(self) -> None:
        tars = ["pause", "busybox"] + (["plugin"] if self.settings.plugin_image else [])
        for t in tars:
            r = self.ctr("images", "import", str(self.root / "images" / f"{t}.tar"))
            if r.returncode != 0:
                raise SetupError(f"ctr images import {t}: {r.stderr.strip()}")
        names = set(self.ctr("images", "ls", "-q").stdout.split())
        for want in (PAUSE_IMAGE, BUSYBOX_IMAGE):
            if want not in names:
                raise SetupError(f"image {want} not named after import (have {sorted(names)})")
        if self.settings.plugin_image:
            want = self.plugin_image_name()
            imported = _image_name_in(self.root / "images/plugin.tar")
            if imported != want:
                r = self.ctr("images", "tag", imported, want)
                if r.returncode != 0:
                    raise SetupError(f"ctr images tag {imported} {want}: {r.stderr.strip()}")

    def plugin_image_name(self) -> str:
        """The image as the rendered DaemonSet names it: imported as if pulled from its registry."""
        r = _check([os.environ.get("PYTHON", "python3"), str(HERE / "pod_from_daemonset.py"), "--image",
                    str(self.root / "rendered.yaml")], "the DaemonSet's image")
        return r.stdout.strip()

    def write_kubelet_config(self) -> None:
        text = KUBELET_CONFIG.format(
            manifests=self.manifests, port=self.kubelet_port, ro_port=self.ro_port,
            healthz_port=self.healthz_port, cgroup=self.cgroup, resolv=self.root / "resolv.conf")
        # From 1.35 the kubelet refuses cgroup v1 hosts unless told otherwise; older ones reject
        # the field.
        if self.settings.kubelet_minor >= 35:
            text += "failCgroupV1: false\n"
        if self.cluster_kubelet:
            # The API server reaches the kubelet at the Node's address (logs, exec).
            text = text.replace("address: 127.0.0.1\n", "address: 0.0.0.0\n", 1)
        (self.root / "resolv.conf").write_text("nameserver 127.0.0.1\n")
        (self.root / "kubelet.yaml").write_text(text)

    def start_kubelet(self, wait: bool = True) -> None:
        self.kubelet_starts += 1
        legacy = []
        # --container-runtime went in 1.27; the sandbox image is the runtime's business from then.
        if self.settings.kubelet_minor < 27:
            legacy = ["--container-runtime=remote", f"--pod-infra-container-image={PAUSE_IMAGE}"]
        self.kubelet = self.spawn("kubelet", [
            str(self.settings.kubelet), f"--config={self.root / 'kubelet.yaml'}",
            "--root-dir=/var/lib/kubelet", *legacy,
            "--container-runtime-endpoint=unix:///run/containerd/containerd.sock",
            f"--hostname-override={self.name}", f"--volume-plugin-dir={self.root / 'volume-plugins'}",
            *self._cluster_args(), "--v=2",
        ], self.kubelet_log())
        if wait:
            self.wait_kubelet_up()

    def _cluster_args(self) -> list[str]:
        if not self.cluster_kubelet:
            return []
        kubeconfig, ip = self.cluster_kubelet
        return [f"--kubeconfig={kubeconfig}", f"--node-ip={ip}"]

    def wait_kubelet_up(self, timeout: float = 60) -> None:
        def up() -> bool:
            if not self.kubelet.alive():
                raise SetupError(f"kubelet exited: {self.kubelet.tail()}")
            return (self.http_get(self.healthz_port, "/healthz") is not None
                    and self.http_get(self.ro_port, "/pods") is not None
                    and (self.device_plugins_dir / "kubelet.sock").is_socket())
        try:
            wait_for(up, timeout, "the kubelet to serve /healthz, /pods and kubelet.sock")
        except WaitTimeout as e:
            raise SetupError(f"{e}: {self.kubelet.tail()}") from e

    def stop_kubelet(self, sig: int = signal.SIGTERM) -> None:
        if self.kubelet:
            self.kubelet.stop(15, sig)

    def stop_containerd(self) -> None:
        if self.containerd:
            self.containerd.stop(15)

    # --- what the node shows ------------------------------------------------------------------
    def watched_sockets(self) -> set[str] | None:
        """The registration sockets of ours the kubelet's plugin manager still holds (its
        `plugin_manager_total_plugins` gauge, desired or actual state); None when the kubelet
        does not answer."""
        text = self.http_get(self.ro_port, "/metrics")
        if text is None:
            return None
        held = set()
        gauge = re.compile(r'plugin_manager_total_plugins\{socket_path="([^"]+)",state="\w+"\} (\S+)')
        for line in text.splitlines():
            m = gauge.match(line)
            if m and "/kdp-" in m.group(1) and float(m.group(2)) > 0:
                held.add(m.group(1))
        return held

    def wait_watcher_let_go(self, timeout: float = 10) -> None:
        """Waits until the kubelet's plugin manager holds no registration socket of ours: kubelets
        1.25 to 1.36 unregister a removed one by resource name, up to a reconciler pass (1 s)
        later, and would drop whichever plugin holds that name by then."""
        wait_for(lambda: not self.watched_sockets(), timeout,
                 "the kubelet's plugin watcher to let go of our registration sockets")

    def pods(self) -> dict[str, Pod]:
        """The kubelet's pods from its read-only port, by name without the node suffix."""
        text = self.http_get(self.ro_port, "/pods")
        if text is None:
            return {}
        try:
            items = json.loads(text).get("items") or []
        except ValueError:
            return {}
        suffix = "-" + self.name
        out = {}
        for item in items:
            pod = Pod.from_json(item)
            out[pod.name.removesuffix(suffix)] = pod
        return out

    def pod(self, name: str) -> Pod | None:
        return self.pods().get(name)

    def checkpoint_devices(self, resource: str) -> int:
        """Healthy devices the kubelet's device manager checkpoint lists for `resource`; -1 when
        it cannot be read."""
        try:
            d = json.loads((self.device_plugins_dir / "kubelet_internal_checkpoint").read_text())
        except (OSError, ValueError):
            return -1
        return len(((d.get("Data") or {}).get("RegisteredDevices") or {}).get(resource) or [])

    def pod_log(self, name: str) -> Path | None:
        """The log file of the (only) container of the pod the kubelet now knows as `name`."""
        pod = self.pod(name)
        if pod is None:
            return None
        found = self.nsroot.glob(f"var-log/pods/*_{name}-{self.name}_{pod.uid}/*/*.log")
        # <restart count>.log: the newest container's is the highest number
        found = sorted(found, key=lambda p: int(p.stem) if p.stem.isdigit() else -1)
        return found[-1] if found else None

    def write_manifest(self, name: str, pod: dict) -> None:
        """Places a static pod: written under a dot name (the kubelet skips those), then renamed."""
        tmp = self.manifests / f".{name}.yaml"
        tmp.write_text(json.dumps(pod, indent=2))
        tmp.rename(self.manifests / f"{name}.yaml")

    def remove_manifest(self, name: str) -> None:
        (self.manifests / f"{name}.yaml").unlink(missing_ok=True)

    def manifest_names(self) -> list[str]:
        return sorted(p.stem for p in self.manifests.glob("*.yaml"))

    # --- processes in the namespace and the pods' cgroups ------------------------------------
    def cgroup_pids(self) -> set[int]:
        pids: set[int] = set()
        for m in _cgroup_mounts():
            d = m / self.cgroup
            if not d.is_dir():
                continue
            # The kubelet creates and removes pod cgroups as we walk: os.walk skips what went.
            for dirpath, _, files in os.walk(d):
                if "cgroup.procs" not in files:
                    continue
                try:
                    pids.update(int(p) for p in Path(dirpath, "cgroup.procs").read_text().split())
                except OSError:
                    pass
        return pids

    def ns_pids(self) -> set[int]:
        if not self.mnt_ns or self.holder is None:
            return set()
        out = set()
        for p in Path("/proc").iterdir():
            if not p.name.isdigit() or int(p.name) == self.holder.pid:
                continue
            try:
                if os.readlink(p / "ns/mnt") == self.mnt_ns:
                    out.add(int(p.name))
            except OSError:
                pass
        return out

    def kill_containers(self) -> None:
        """What a power cut does to the pods: every container process dies at once."""
        for _ in range(20):
            pids = self.cgroup_pids()
            if not pids:
                return
            _kill(pids)
            time.sleep(0.2)

    def power_cut(self, keep: set[int] | None = None) -> None:
        """What a power cut does to the node: the kubelet, containerd, every container and shim
        stop at once, and /run (a tmpfs on real nodes) comes back empty. `keep`: processes that
        live elsewhere on a real cluster (the control plane) and survive it."""
        self.stop_kubelet(sig=signal.SIGKILL)
        self.kill_containers()
        if self.containerd:
            self.containerd.stop(5, signal.SIGKILL)
        _kill(self.ns_pids() - (keep or set()))  # the shims
        for entry in (self.nsroot / "run").iterdir():
            if entry.name == ".kdp-e2e":
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)

    def down(self) -> None:
        """Stops everything by PID, removes the cgroups; keeps the state root if anything failed."""
        self.stop_kubelet()
        self.kill_containers()
        self.stop_containerd()
        leftover = self.ns_pids()
        if leftover:
            _kill(leftover)
            time.sleep(0.5)
        if self.holder:
            self.holder.stop(5)
        self._remove_cgroups()
        if self.failed or self.settings.keep:
            shutil.rmtree(self.nsroot / "var-lib/containerd", ignore_errors=True)
            print(f"state and logs kept in {self.root}")
        else:
            shutil.rmtree(self.root, ignore_errors=True)

    def _remove_cgroups(self) -> None:
        for _ in range(10):
            left = False
            for m in _cgroup_mounts():
                d = m / self.cgroup
                if not d.is_dir():
                    continue
                for dirpath, _, _ in os.walk(d, topdown=False):  # deepest first
                    try:
                        os.rmdir(dirpath)
                    except OSError:
                        pass
                if d.exists():
                    left = True
            if not left:
                return
            _kill(self.cgroup_pids())
            time.sleep(0.5)
        print(f"warning: could not remove cgroup {self.cgroup}")


def _kill(pids: set[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def _check(args: list[str], what: str) -> subprocess.CompletedProcess:
    r = subprocess.run(args, capture_output=True, text=True)
    if r.returncode != 0:
        raise SetupError(f"{what}: {' '.join(args)} failed: {r.stderr.strip()}")
    return r


def _image_name_in(tar: Path) -> str:
    with tarfile.open(tar) as t:
        index = json.load(t.extractfile("index.json"))
    return index["manifests"][0]["annotations"]["io.containerd.image.name"]


KUBELET_CONFIG = """\
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
staticPodPath: {manifests}
fileCheckFrequency: 5s
syncFrequency: 10s
address: 127.0.0.1
port: {port}
readOnlyPort: {ro_port}
healthzBindAddress: 127.0.0.1
healthzPort: {healthz_port}
authentication:
  anonymous:
    enabled: true
  webhook:
    enabled: false
authorization:
  mode: AlwaysAllow
cgroupDriver: cgroupfs
cgroupRoot: /{cgroup}
failSwapOn: false
makeIPTablesUtilChains: false
resolvConf: {resolv}
enableControllerAttachDetach: false
evictionHard:
  memory.available: "1Mi"
  nodefs.available: "1%"
  nodefs.inodesFree: "1%"
  imagefs.available: "1%"
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
"""

# Debian's containerd 1.6 (config version 2).
CONTAINERD_1_CONFIG = """\
version = 2
root = "/var/lib/containerd"
state = "/run/containerd"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper"]

[grpc]
  address = "/run/containerd/containerd.sock"

[plugins]
  [plugins."io.containerd.grpc.v1.cri"]
    sandbox_image = "{pause}"
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
      conf_dir = "{cni_conf}"
  [plugins."io.containerd.internal.v1.opt"]
    path = "/var/lib/containerd/opt"
"""

# containerd 2 (config version 3): the CRI plugin split into images, runtime and the gRPC service.
# 2.4 reads version 3 and logs that it migrated it to its current 4; 3 is what every 2.x reads.
CONTAINERD_2_CONFIG = """\
version = 3
root = "/var/lib/containerd"
state = "/run/containerd"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.blockfile",
  "io.containerd.snapshotter.v1.erofs"]

[grpc]
  address = "/run/containerd/containerd.sock"

[plugins]
  [plugins.'io.containerd.cri.v1.images']
    snapshotter = "overlayfs"
    [plugins.'io.containerd.cri.v1.images'.pinned_images]
      sandbox = "{pause}"

  [plugins.'io.containerd.cri.v1.runtime']
    # No CAP_SYS_RESOURCE in this VM: without this every sandbox fails with
    # "can't get final child's PID from pipe: EOF".
    restrict_oom_score_adj = true
    # Never load an AppArmor profile into the host's kernel.
    disable_apparmor = true
    enable_selinux = false
    # CDI is always on in containerd 2; these are its default directories, where the plugin's
    # spec goes (/var/run/cdi is the namespace's own /run).
    cdi_spec_dirs = ["/etc/cdi", "/var/run/cdi"]
    [plugins.'io.containerd.cri.v1.runtime'.containerd]
      default_runtime_name = "runc"
      [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
        runtime_type = "io.containerd.runc.v2"
        [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
          SystemdCgroup = false
          BinaryName = "/usr/sbin/runc"
    [plugins.'io.containerd.cri.v1.runtime'.cni]
      bin_dirs = ["/usr/lib/cni"]
      conf_dir = "{cni_conf}"

  [plugins.'io.containerd.grpc.v1.cri']
    stream_server_address = "127.0.0.1"
    stream_server_port = "0"

  [plugins.'io.containerd.internal.v1.opt']
    path = "/var/lib/containerd/opt"
"""
