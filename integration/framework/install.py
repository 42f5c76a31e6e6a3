"""Our manifests on a Cluster, the way an operator installs them: an overlay of ours with our
image (imported, never pulled) and a ConfigMap of the scenario's, applied with `kubectl apply -k`;
and the probe pods the scenarios place, with what each saw."""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import yaml

from .cluster import Cluster
from .harness import numbers
from .node import BUSYBOX_IMAGE
from .pods import DOMAIN, PROBE, PROBED, Pod, reports_from_text
from .wait import wait_for

NS = "kubelet-device-plugins"
DS = "daemonset/kubelet-device-plugins"
PLUGIN_LABEL = "app.kubernetes.io/name=kubelet-device-plugins"
DEV = {"kvm": "/dev/kvm", "tun": "/dev/net/tun", "fuse": "/dev/fuse"}

# The resources overlay's ConfigMap, replaced by the test overlay: small counts, so that "count
# + 1" pods fit on a 2-core machine.
CONFIG = {"resources": [{"name": "kvm", "count": 2}, {"name": "tun", "count": 3},
                        {"name": "fuse", "count": 2}]}


class Install:
    """The test overlay (manifests/overlays/resources with our image and ConfigMap) and what
    applying it shows."""

    def __init__(self, cluster: Cluster, measures: list[str], overlay: str = "resources",
                 config: dict | None = None):
        self.c, self.measures, self.overlay = cluster, measures, overlay
        root = cluster.node.root / "kustomize"
        shutil.copytree(cluster.node.settings.manifests, root / "manifests", dirs_exist_ok=True)
        self.dir = root / f"e2e-{overlay}"
        self.dir.mkdir(exist_ok=True)
        self.env: dict[str, str] = {}
        # What manifests/overlays/kubernetes-1.21 does, on the clusters it is for.
        self.default_strategy = None if surge_supported(cluster) else IN_PLACE
        self.strategy: dict | None = None
        self.write(config or CONFIG)
        self.applied = False

    def measure(self, text: str) -> None:
        self.measures.append(f"[cluster 1.{self.c.node.settings.kubelet_minor}] {text}")

    def write(self, config: dict) -> None:
        """The overlay an operator would write: our image as imported (never pulled), our
        config; env vars and an update strategy when a scenario sets them."""
        (self.dir / "config.yaml").write_text(yaml.safe_dump(config))
        ops = [{"op": "replace", "path": "/spec/template/spec/containers/0/imagePullPolicy",
                "value": "Never"}]
        for name, value in self.env.items():
            ops.append({"op": "add", "path": "/spec/template/spec/containers/0/env/-",
                        "value": {"name": name, "value": value}})
        strategy = self.strategy or self.default_strategy
        if strategy is not None:
            ops.append({"op": "replace", "path": "/spec/updateStrategy", "value": strategy})
        (self.dir / "kustomization.yaml").write_text(yaml.safe_dump({
            "apiVersion": "kustomize.config.k8s.io/v1beta1",
            "kind": "Kustomization",
            "resources": [f"../manifests/overlays/{self.overlay}"],
            "configMapGenerator": [{
                "name": "kubelet-device-plugins-config", "namespace": NS, "behavior": "replace",
                "files": ["config.yaml"], "options": {"disableNameSuffixHash": True}}],
            "patches": [{"target": {"kind": "DaemonSet", "name": "kubelet-device-plugins"},
                         "patch": json.dumps(ops)}],
        }))

    def apply(self) -> str:
        """`kubectl apply -k`; any warning the API server sends back fails the scenario."""
        r = self.c.kubectl("apply", "-k", str(self.dir))
        warnings = [l for l in r.stderr.splitlines() if l.strip()]
        assert not warnings, f"kubectl apply -k warned: {warnings}"
        self.applied = True
        return r.stdout

    def rollout(self, timeout: int = 180) -> float:
        """Seconds `kubectl rollout status` took to return success."""
        start = time.monotonic()
        self.c.kubectl("-n", NS, "rollout", "status", DS, f"--timeout={timeout}s", timeout=timeout + 10)
        return time.monotonic() - start

    def plugin_pods(self) -> list[dict]:
        return self.c.get_json("pods", "-n", NS, "-l", PLUGIN_LABEL)["items"]

    def expect_allocatable(self, want: dict[str, int], timeout: float = 60) -> float:
        start = time.monotonic()
        try:
            wait_for(lambda: self.allocatable() == want, timeout, f"allocatable {want}")
        except AssertionError as e:
            raise AssertionError(f"{e}: the node shows {self.allocatable()}") from None
        return time.monotonic() - start

    def allocatable(self) -> dict[str, int]:
        """Our resources in the node's allocatable, those at 0 left out (a withdrawn resource
        stays in the list at 0 until the kubelet drops it)."""
        return {k: v for k, v in self.c.allocatable(DOMAIN).items() if v}


def probe_pod(name: str, resources: dict[str, int], labels: dict | None = None) -> dict:
    """A pod (or a Deployment's template) whose container reports the device nodes it sees."""
    container = {"name": "probe", "image": BUSYBOX_IMAGE, "imagePullPolicy": "Never",
                 "command": ["/bin/sh", "-c", PROBE.replace("@PROBED@", " ".join(PROBED))]}
    if resources:
        container["resources"] = {"limits": {f"{DOMAIN}/{r}": str(n) for r, n in resources.items()}}
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "default", "labels": labels or {"kdp-e2e": name}},
            "spec": {"hostNetwork": True, "dnsPolicy": "Default", "terminationGracePeriodSeconds": 1,
                     "automountServiceAccountToken": False, "containers": [container]}}


def pods(c: Cluster, selector: str) -> list[Pod]:
    return [Pod.from_json(i) for i in c.get_json("pods", "-n", "default", "-l", selector)["items"]]


def seen(c: Cluster, pod: str) -> dict[str, str]:
    """What the pod's probe last reported, through `kubectl logs`."""
    def report():
        r = c.kubectl("logs", "-n", "default", pod, check=False, timeout=20)
        reps = reports_from_text(r.stdout) if r.returncode == 0 else []
        return reps[-1] if reps else None
    rep = wait_for(report, 30, f"a report in {pod}'s log")
    return {p: ("absent" if rep.get(p) is None or rep[p].kind == "absent"
                else f"{rep[p].kind} {rep[p].numbers} open={'ok' if rep[p].opens else 'denied'}")
            for p in PROBED}


def expected(*resources: str) -> dict[str, str]:
    return {path: (f"character special file {numbers(path)} open=ok" if r in resources else "absent")
            for r, path in DEV.items()}


def unschedulable(pod: Pod, obj: dict) -> str:
    for cond in obj.get("status", {}).get("conditions") or []:
        if cond.get("type") == "PodScheduled" and cond.get("status") == "False":
            return cond.get("message", "")
    return ""


def leftovers(node) -> list[str]:
    """Files of ours on the node after an uninstall: sockets, locks, CDI specs, whatever their
    directory (the DaemonSet's DirectoryOrCreate host paths are the kubelet's to keep)."""
    ours = re.compile(r"(kdp|kubelet-device-plugins)")
    left = [str(p.relative_to(node.nsroot)) for d in (node.device_plugins_dir, node.kubelet_dir / "plugins_registry",
                                                      node.kubelet_dir / "plugins", node.cdi_dir)
            if d.exists() for p in d.rglob("*") if ours.search(p.name) or p.suffix == ".lock"]
    return [p for p in left if not p.endswith("plugins/kubelet-device-plugins")]


SURGE = {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
IN_PLACE = {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}}


def surge_supported(c: Cluster) -> bool:
    """DaemonSet maxSurge: no such field in 1.20, behind a gate that is off in 1.21."""
    return c.node.settings.kubelet_minor >= 22


# What our driver needs of the API server when it runs as a process rather than as the
# DaemonSet's pod: its ServiceAccount and the DRA overlay's RBAC.
DRIVER_RBAC = ("base/namespace.yaml", "base/serviceaccount.yaml", "overlays/dra/rbac.yaml")


def driver_credentials(c: Cluster, creds: Path) -> Path:
    """Our ServiceAccount and RBAC applied, and in `creds` what `--credentials` reads: a token
    the API server issued for that ServiceAccount and the cluster's CA."""
    manifests = c.node.settings.manifests
    for f in DRIVER_RBAC:
        c.kubectl("apply", "-n", NS, "-f", str(manifests / f))
    creds.mkdir(parents=True, exist_ok=True)
    token = c.kubectl("create", "token", "kubelet-device-plugins", "-n", NS, "--duration=2h").stdout.strip()
    (creds / "token").write_text(token)
    (creds / "ca.crt").write_bytes(Path(c.pki.ca).read_bytes())
    return creds


def remove_driver_rbac(c: Cluster) -> None:
    manifests = c.node.settings.manifests
    for f in reversed(DRIVER_RBAC):
        c.kubectl("delete", "-n", NS, "-f", str(manifests / f), "--ignore-not-found", check=False, timeout=120)
