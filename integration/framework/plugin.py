"""The plugin under test, run the ways operators run it: as a process with a --registration mode
(kubelet-socket, plugin-watcher), or as the DaemonSet's pod (a static pod made from the rendered
manifests by pod_from_daemonset.py). Both give the same handle: start, stop, its log, and how
often it registered each resource."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

from .node import HERE, Node, Process, SetupError
from .pods import DOMAIN
from .wait import wait_for

RESOURCES = ["kvm", "tun", "fuse"]
COUNT = 2  # --count: containers that may share each device
POD_NAME = "kdp-plugin"


class Plugin:
    """What every run mode shares; `mode` is "kubelet-socket", "plugin-watcher" or "pod"."""

    def __init__(self, node: Node, mode: str):
        self.node, self.mode = node, mode
        self.starts = 0
        self.log: Path = node.logs / "plugin-0.log"
        self.options: dict = {}

    def default(self) -> bool:
        """Whether it runs as every scenario expects to find it: no options, registered."""
        return self.running() and not self.options

    # --- subclasses ---------------------------------------------------------------------------
    def start(self, **options) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def running(self) -> bool:
        raise NotImplementedError

    def pids(self) -> list[int]:
        raise NotImplementedError

    # --- what it logged -----------------------------------------------------------------------
    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def tail(self, lines: int = 20) -> str:
        return "\n".join("    plugin: " + l for l in self.log_text().splitlines()[-lines:])

    def registrations(self, resource: str) -> int:
        """Successful Registers this plugin process logged for `resource` (short name)."""
        return self.log_text().count(f"registered {DOMAIN}/{resource} ")

    def registered_everything(self, at_least: int = 1, resources=RESOURCES) -> bool:
        if not self.running() and self.mode != "pod":
            raise AssertionError(f"the plugin exited:\n{self.tail(5)}")
        return all(self.registrations(r) >= at_least for r in resources)

    def wait_registered(self, at_least: int = 1, timeout: float = 30, resources=RESOURCES) -> None:
        wait_for(lambda: self.registered_everything(at_least, resources), timeout,
                 f"{', '.join(resources)} registered {at_least} time(s)")

    def used_kubelet_socket(self) -> bool:
        return "with the kubelet in" in self.log_text()

    def restart(self, **options) -> None:
        self.stop()
        self.start(**options)


class PluginProcess(Plugin):
    """The plugin as a process in the node's namespace, with `--registration <mode>`."""

    def __init__(self, node: Node, mode: str, label: str = ""):
        super().__init__(node, mode)
        self.process: Process | None = None
        # Another instance beside the session's (a rollout's new pod) logs to files of its own.
        self.label = f"{label}-" if label else ""

    def start(self, *, dev_root: Path | None = None, config: Path | None = None,
              sys_root: Path | None = None, **rest) -> None:
        if rest:
            raise TypeError(f"options a plugin process does not take: {sorted(rest)}")
        self.starts += 1
        self.log = self.node.logs / f"plugin-{self.mode}-{self.label}{self.starts}.log"
        self.options = {k: v for k, v in (("dev_root", dev_root), ("config", config),
                                          ("sys_root", sys_root)) if v}
        args = [str(self.node.settings.plugin_bin), "--log-level", "debug", "serve",
                "--plugin-dir", "/var/lib/kubelet/device-plugins", "--registration", self.mode]
        if config:
            args += ["--config", str(config)]
        else:
            args += ["--resource", ",".join(RESOURCES), "--count", str(COUNT)]
        if dev_root:
            args += ["--dev-root", str(dev_root)]
        if sys_root:
            args += ["--sys-root", str(sys_root)]
        env = {k: v for k, v in os.environ.items() if k != "RUST_LOG" and not k.startswith("KDP_")}
        self.process = self.node.spawn("plugin", args, self.log, env=env)

    def stop(self) -> None:
        if self.process:
            self.process.stop(10)
            self.process = None

    def running(self) -> bool:
        return self.process is not None and self.process.alive()

    def pids(self) -> list[int]:
        return [self.process.pid] if self.running() else []


class PluginPod(Plugin):
    """The plugin as the DaemonSet's pod: its template as a static pod, plus only the scenario's
    resources and count as env (and what start's options add, each an overlay an operator could
    write). Deleting the manifest makes the kubelet stop it with SIGTERM."""

    def __init__(self, node: Node):
        super().__init__(node, "pod")
        self.live = False
        if not node.settings.plugin_image:
            raise SetupError("the pod runs need PLUGIN_IMAGE (integration/build-image.sh)")

    def manifest(self, *, dev_root: Path | None = None, run_as: int | None = None,
                 config: Path | None = None) -> dict:
        args = ["--name", POD_NAME, "--annotation", f"kdp-e2e/created={os.getpid()}-plugin-{self.starts}"]
        if config:
            args += ["--env", f"KDP_CONFIG={config}", "--host-dir", str(config.parent)]
        else:
            args += ["--env", f"KDP_RESOURCES={','.join(RESOURCES)}", "--env", f"KDP_COUNT={COUNT}"]
        if dev_root:
            args += ["--env", f"KDP_DEV_ROOT={dev_root}", "--host-dir", str(dev_root)]
        if run_as is not None:
            args += ["--run-as", str(run_as)]
        r = subprocess.run([os.environ.get("PYTHON", "python3"), str(HERE / "pod_from_daemonset.py"),
                            str(self.node.root / "rendered.yaml"), *args],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise SetupError(f"pod_from_daemonset.py: {r.stderr.strip()}")
        return json.loads(r.stdout)

    def start(self, **options) -> None:
        self.starts += 1
        self.options = {k: v for k, v in options.items() if v is not None}
        pod = self.manifest(**options)
        (self.node.logs / f"plugin-pod-{self.starts}.json").write_text(json.dumps(pod, indent=2))
        self.node.write_manifest(POD_NAME, pod)
        self.log = self.node.logs / f"plugin-pod-{self.starts}.log"
        # Its container's log, once the kubelet started it (the copy is made at stop).
        self.log = wait_for(lambda: self.node.pod_log(POD_NAME), self.node.settings.pod_timeout,
                            "the plugin's pod to start a container")
        self.live = True

    def log_text(self) -> str:
        # A container the kubelet started again (after a node reboot, say) logs to a new file:
        # what "this plugin process" logged is the newest container's log.
        if self.live:
            self.log = self.node.pod_log(POD_NAME) or self.log
        return super().log_text()

    def stop(self) -> None:
        if not (self.node.manifests / f"{POD_NAME}.yaml").exists():
            return
        pids = self.pids()
        self.log_text()
        self.live = False
        self.node.remove_manifest(POD_NAME)
        wait_for(lambda: self.node.pod(POD_NAME) is None, 60, "the kubelet to forget the plugin's pod")
        # Newer kubelets (1.37) drop a static pod from their list before its container is sent
        # SIGTERM: the plugin's own exit is what says its shutdown is over.
        wait_for(lambda: not any(Path(f"/proc/{p}").exists() for p in pids), 40,
                 f"the plugin pod's processes {pids} to exit")
        copy = self.node.logs / f"plugin-pod-{self.starts}.log"
        if self.log != copy:
            try:
                shutil.copy(self.log, copy)
            except OSError:
                pass
            self.log = copy

    def running(self) -> bool:
        pod = self.node.pod(POD_NAME)
        return pod is not None and pod.running

    def ready(self) -> bool:
        pod = self.node.pod(POD_NAME)
        return pod is not None and pod.ready is True

    def wait_ready(self, timeout: float = 60) -> None:
        wait_for(self.ready, timeout, "the plugin's pod to be Ready (its /readyz probe)")

    def pids(self) -> list[int]:
        out = []
        for p in sorted(self.node.cgroup_pids()):
            try:
                if os.readlink(f"/proc/{p}/exe").endswith("/kubelet-device-plugins"):
                    out.append(p)
            except OSError:
                pass
        return out

    def memory(self) -> str | None:
        """RSS and threads of the plugin's process, and its container's memory cgroup (usage, and
        the working set that limits and evictions go by: usage less inactive file pages)."""
        pids = self.pids()
        if not pids:
            return None
        pid = pids[0]
        st = {}
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            k, _, v = line.partition(":")
            st[k] = v.split()
        mib = lambda kib: f"{kib / 1024:.1f} MiB"
        out = (f"RSS {mib(int(st['VmRSS'][0]))} ({mib(int(st['RssAnon'][0]))} anonymous, "
               f"{mib(int(st['RssFile'][0]))} file-backed), {st['Threads'][0]} threads")
        for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
            hid, ctrls, path = line.split(":", 2)
            if "memory" in ctrls.split(","):
                base, usage, inactive = Path("/sys/fs/cgroup/memory" + path), "memory.usage_in_bytes", "total_inactive_file"
            elif hid == "0" and ctrls == "":
                base, usage, inactive = Path("/sys/fs/cgroup" + path), "memory.current", "inactive_file"
            else:
                continue
            try:
                used = int((base / usage).read_text())
                stat = dict(l.split() for l in (base / "memory.stat").read_text().splitlines())
                ws = used - int(stat.get(inactive, 0))
                out += f"; container cgroup: usage {mib(used / 1024)}, working set {mib(ws / 1024)}"
            except OSError:
                pass
            break
        return out


def make(node: Node, mode: str) -> Plugin:
    return PluginPod(node) if mode == "pod" else PluginProcess(node, mode)
