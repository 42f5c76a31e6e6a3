"""What scenarios do on a node with the plugin running: create probe pods, wait for them to run
or be refused, read what their containers see, and follow the kubelet's view of our devices."""

from __future__ import annotations

import itertools
import os
import re
import stat
from datetime import datetime
from pathlib import Path

from .node import BUSYBOX_IMAGE, Node
from .plugin import RESOURCES, Plugin
from .pods import DOMAIN, PROBED, Pod, Seen, cri_log_text, probe_pod, read_reports
from .wait import wait_for
from .workloads import Outcome, finished_outcome, workload_pod

# Where each built-in resource's node is, as containers see it, and relative to a --dev-root.
DEV = {"kvm": "/dev/kvm", "tun": "/dev/net/tun", "fuse": "/dev/fuse"}
REL = {"kvm": "kvm", "tun": "net/tun", "fuse": "fuse"}


def numbers(path: str | Path) -> str:
    """major:minor in hex, as the probe's `stat -c %t:%T` prints them."""
    rdev = os.stat(path).st_rdev
    return f"{os.major(rdev):x}:{os.minor(rdev):x}"


class Harness:
    def __init__(self, node: Node, plugin: Plugin, measures: list[str], notes: list[str]):
        self.node, self.plugin = node, plugin
        self.measures, self.notes = measures, notes

    @property
    def timeout(self) -> float:
        return self.node.settings.pod_timeout

    def measure(self, text: str) -> None:
        self.measures.append(f"[kubelet 1.{self.node.settings.kubelet_minor}, {self.plugin.mode}] {text}")

    # --- pods ---------------------------------------------------------------------------------
    def create_pod(self, name: str, *resources: str, probed=PROBED, **spec_extra) -> None:
        # Unique over the whole run: a manifest met before would bring back that pod's end.
        unique = f"{os.getpid()}-{next(_CREATED)}"
        pod = probe_pod(name, BUSYBOX_IMAGE, list(resources), unique, probed, **spec_extra)
        self.node.write_manifest(name, pod)

    def create_workload_pod(self, name: str, resource: str, *, granted: bool, mknod: str = "") -> None:
        """The docs' example pod for `resource` running its real workload (workloads.py), on
        the pod network: a TUN interface and a FUSE mount stay inside the pod."""
        pod = workload_pod(resource, name, BUSYBOX_IMAGE, granted=granted, mknod=mknod)
        pod["metadata"]["annotations"] = {"kdp-e2e/created": f"{os.getpid()}-{next(_CREATED)}"}
        self.node.write_manifest(name, pod)

    def workload_outcome(self, name: str, program: str) -> Outcome:
        """Once the pod's container has exited: the line its workload printed."""
        pod = self.wait_pod(name, lambda p: p.ended, "finished")
        log = self.node.pod_log(name)
        return finished_outcome(f"{name} ({pod})", pod.phase, cri_log_text(log) if log else "", program)

    def pod(self, name: str) -> Pod | None:
        return self.node.pod(name)

    def wait_pod(self, name: str, done, what: str, timeout: float | None = None) -> Pod:
        """Until `done(pod)` holds; a pod the kubelet never listed within 30 s was rejected."""
        timeout = timeout or self.timeout
        start = [None]

        def check():
            pod = self.node.pod(name)
            if pod is None:
                return None
            start[0] = pod
            return pod if done(pod) else None

        try:
            return wait_for(check, timeout, f"{name} to be {what}")
        except AssertionError as e:
            raise AssertionError(f"{e}; last seen: {start[0] or 'unknown to the kubelet'}") from None

    def wait_running(self, name: str, timeout: float | None = None) -> Pod:
        def done(pod: Pod) -> bool:
            if pod.ended:
                raise AssertionError(f"{name} ended instead of running: {pod}")
            return pod.running
        return self.wait_pod(name, done, "running", timeout)

    def wait_refused(self, name: str) -> Pod:
        def done(pod: Pod) -> bool:
            if pod.running:
                raise AssertionError(f"{name} runs, expected it refused admission: {pod}")
            return pod.phase == "Failed"
        pod = self.wait_pod(name, done, "refused admission", 60)
        assert pod.refused, f"{name} failed, but not with UnexpectedAdmissionError: {pod}"
        return pod

    def delete_pods(self, *names: str) -> None:
        for n in names:
            self.node.remove_manifest(n)
        wait_for(lambda: not any(self.node.pod(n) for n in names), 60,
                 f"the kubelet to forget {', '.join(names)}")

    def delete_all_pods(self) -> None:
        names = [n for n in self.node.manifest_names() if n != "kdp-plugin"]
        if names:
            self.delete_pods(*names)

    # --- what containers see -------------------------------------------------------------------
    def reports(self, name: str) -> list[dict[str, Seen]]:
        log = self.node.pod_log(name)
        return read_reports(log) if log else []

    def report(self, name: str, after: int = 0) -> dict[str, Seen]:
        """The newest complete report, once there are more than `after` of them."""
        return wait_for(lambda: (lambda r: r[-1] if len(r) > after else None)(self.reports(name)),
                        20, f"report number {after + 1} in {name}'s log")

    def expected(self, *resources: str) -> dict[str, str]:
        """What the probe should print for each node: the requested ones present with the host's
        numbers and openable, the others absent."""
        out = {}
        for r in RESOURCES:
            out[DEV[r]] = (f"character special file {numbers(DEV[r])} open=ok" if r in resources
                           else "absent")
        return out

    def assert_sees(self, name: str, *resources: str, after: int = 0) -> None:
        """The pod runs and its container sees exactly these devices."""
        self.wait_running(name)
        seen = self.report(name, after)
        got = {}
        for path in self.expected():
            s = seen.get(path)
            got[path] = ("absent" if s is None or s.kind == "absent"
                         else f"{s.kind} {s.numbers} open={'ok' if s.opens else 'denied'}")
        assert got == self.expected(*resources), f"{name} sees {got}"

    # --- the kubelet's view of our devices ---------------------------------------------------
    def wait_devices(self, resource: str, n: int, timeout: float = 30) -> None:
        """Until the kubelet's checkpoint lists `n` healthy devices of `resource`."""
        full = f"{DOMAIN}/{resource}"
        try:
            wait_for(lambda: self.node.checkpoint_devices(full) == n, timeout,
                     f"the kubelet's checkpoint to list {n} healthy {resource} device(s)")
        except AssertionError as e:
            raise AssertionError(f"{e} (it lists {self.node.checkpoint_devices(full)})") from None

    def make_test_node(self, resource: str) -> Path:
        """A copy of the host's node under the test dev root: same type, numbers and mode."""
        host = os.stat(DEV[resource])
        dst = self.node.devroot / REL[resource]
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(dst.name + ".tmp")
        tmp.unlink(missing_ok=True)
        os.mknod(tmp, stat.S_IFCHR | stat.S_IMODE(host.st_mode), host.st_rdev)
        os.chmod(tmp, stat.S_IMODE(host.st_mode))
        tmp.rename(dst)
        return dst

    def leftover_sockets(self) -> list[str]:
        """Sockets named like ours (kdp-*, and the temporary .kdp-*) under the kubelet's root.
        Only our names count: each kubelet release has sockets of its own there."""
        return sorted(str(p.relative_to(self.node.kubelet_dir))
                      for p in self.node.kubelet_dir.rglob("*")
                      if p.name.startswith(("kdp-", ".kdp-")) and p.is_socket())

    def wait_registered_again(self, before: dict[str, int], timeout: float = 30) -> None:
        wait_for(lambda: all(self.plugin.registrations(r) > before[r] for r in RESOURCES), timeout,
                 "the plugin to register every resource again")

    def registrations(self) -> dict[str, int]:
        return {r: self.plugin.registrations(r) for r in RESOURCES}


_CREATED = itertools.count(1)
_STAMP = re.compile(r"^[IWEF](\d{4} \d{2}:\d{2}:\d{2}\.\d{6})")


def kubelet_events(log: Path, resources: list[str]) -> tuple[dict[str, datetime], dict[str, datetime]]:
    """From a kubelet log: when it started and when its device manager did ({"first", "manager"}),
    and when it registered each resource's endpoint ("Registered endpoint" up to some release,
    "Registered client" in 1.37)."""
    marks: dict[str, datetime] = {}
    seen: dict[str, datetime] = {}
    for text in log.read_text(errors="replace").splitlines():
        m = _STAMP.match(text)
        if not m:
            continue
        t = datetime.strptime(m.group(1), "%m%d %H:%M:%S.%f")
        marks.setdefault("first", t)
        if "Starting Device Plugin manager" in text:
            marks.setdefault("manager", t)
        if "Registered endpoint" in text or "Registered client" in text:
            for r in resources:
                # 1.25 to 1.36 name the resource, not the socket; the socket is either slot's.
                if re.search(rf"kdp-{r}(~\d+)?\.sock", text) or f'name="{DOMAIN}/{r}"' in text:
                    seen.setdefault(r, t)
    return marks, seen


def ms(a: datetime | None, b: datetime | None) -> str:
    return f"{(b - a).total_seconds() * 1000:.0f} ms" if a and b else "never"


def one_client_per_name(minor: int) -> bool:
    """Kubelets 1.25 to 1.36 keep one device plugin client per resource name: when an older
    instance's stream ends they disconnect the newest, and refuse pods asking for the resource
    until it registers again (kubernetes PR #135437 fixed it in 1.37)."""
    return 25 <= minor <= 36


_RESOURCE = re.compile(r'resourceName="([^"]+)"')
_HEALTHY = re.compile(r"healthyCount=(\d+)")


def unhealthy_windows(log: Path, resource: str, since: int = 0) -> list[float]:
    """From a kubelet log (-v 2, 1.25 and later), from byte `since` on: each time the device
    manager marked `resource` (full name) unhealthy when an endpoint went, how many ms until a
    device list with healthy devices came again; a window still open at the end counts as
    infinity."""
    windows: list[float] = []
    opened: datetime | None = None
    with open(log, "rb") as f:
        f.seek(since)
        lines = f.read().decode(errors="replace").splitlines()
    for text in lines:
        m, r = _STAMP.match(text), _RESOURCE.search(text)
        if not m or not r or r.group(1) != resource:
            continue
        t = datetime.strptime(m.group(1), "%m%d %H:%M:%S.%f")
        if "Endpoint became unhealthy" in text and opened is None:
            opened = t
        elif "Processed device updates for resource" in text and opened is not None:
            h = _HEALTHY.search(text)
            if h and int(h.group(1)) > 0:
                windows.append((t - opened).total_seconds() * 1000)
                opened = None
    if opened is not None:
        windows.append(float("inf"))
    return windows

