"""The Helm chart (charts/kubelet-device-plugins) with a real helm, v4 built from the modules
.ci/tools/go.mod pins, on a one-node cluster of real components: its renders pass the release's
API server (dry run, no warning) in each mode the release has; `helm install` rolls out and the
node offers the chart's resources; `helm upgrade` with another resource list changes what the node
offers without restarting the pod; `helm uninstall` leaves nothing of ours in the API or on the
host.

Runs before test_install.py (file order) and leaves the cluster as it found it.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from framework.install import CONFIG, NS, PLUGIN_LABEL, leftovers
from framework.pods import DOMAIN
from framework.wait import wait_for

CHART = Path(__file__).resolve().parents[2] / "charts/kubelet-device-plugins"
RELEASE = "kdp"
# The upgrade: a count changed, a resource added (any device node), one removed.
CONFIG_UPGRADED = {"resources": [{"name": "kvm", "count": 3}, {"name": "tun", "count": 3},
                                 {"name": "zero", "count": 1, "devices": [{"path": "/dev/zero"}]}]}


def helm(c, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    """helm as the cluster's admin, inside the node's network namespace."""
    cmd = ["nsenter", "-t", str(c.node.holder.pid), "-n", "--", c.node.settings.helm,
           f"--kubeconfig={c.admin}", *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed ({r.returncode}): {r.stderr.strip()}")
    return r


def settings(config: dict, *extra: str) -> list[str]:
    """Values for our image as imported (never pulled) and the scenario's resources."""
    return ["--namespace", NS, "--set", "image.pullPolicy=Never",
            "--set-json", f"config={json.dumps(config)}", *extra]


def allocatable(c) -> dict[str, int]:
    return {k: v for k, v in c.allocatable(DOMAIN).items() if v}


def ours(c) -> list[str]:
    """Every object the release made that is still in the API."""
    selector = f"app.kubernetes.io/instance={RELEASE},app.kubernetes.io/name=kubelet-device-plugins"
    kinds = "daemonsets,configmaps,serviceaccounts,networkpolicies,services,clusterroles,clusterrolebindings"
    found = c.get_json(kinds, "--all-namespaces", "-l", selector)["items"]
    if c.node.settings.kubelet_minor >= 34:
        found += c.get_json("deviceclasses", "-l", selector)["items"]
    return [f"{o['kind']}/{o['metadata']['name']}" for o in found]


@pytest.fixture(scope="module")
def chart_cluster(cluster):
    """The cluster with our namespace as the README says to make it, and nothing of the chart's
    left when the module ends, however it ends."""
    c = cluster
    c.kubectl("create", "namespace", NS)
    c.kubectl("label", "namespace", NS, "pod-security.kubernetes.io/enforce=privileged")
    try:
        yield c
    finally:
        helm(c, "uninstall", RELEASE, "--namespace", NS, "--wait", check=False)
        c.kubectl("delete", "namespace", NS, "--wait=true", "--ignore-not-found", timeout=180)


def test_helm_lint_and_renders_pass_the_api_server(chart_cluster):
    """1. `helm lint --strict`, and `helm template` for this release, in each mode it has
    (DRA's DeviceClasses name extended resources, on by default from 1.36), applied with `--dry-run=server`:
    nothing refused, no warning."""
    c = chart_cluster
    minor = c.node.settings.kubelet_minor
    modes = [[]] + ([["--set", "mode=dra"]] if minor >= 36 else [])
    for mode in modes:
        helm(c, "lint", "--strict", str(CHART), *mode)
        rendered = helm(c, "template", RELEASE, str(CHART), *settings(CONFIG, *mode),
                        "--kube-version", f"1.{minor}.0").stdout
        r = c.kubectl("apply", "--dry-run=server", "-f", "-", stdin=rendered, check=False)
        assert r.returncode == 0 and not r.stderr.strip(), f"{mode or 'device-plugin'}: {r.stderr.strip()}"


def test_helm_install_rolls_out_and_the_node_offers_the_resources(chart_cluster, measures):
    """2. `helm install --wait`: the DaemonSet's pod is Ready when it returns (a surge update
    strategy from 1.22, in place before, chosen by the chart from the API server's version), and
    the node's allocatable shows every configured resource with its count."""
    c = chart_cluster
    start = time.monotonic()
    helm(c, "install", RELEASE, str(CHART), *settings(CONFIG), "--wait", "--timeout", "180s")
    took = time.monotonic() - start
    [ds] = c.get_json("daemonsets", "-n", NS, "-l", PLUGIN_LABEL)["items"]
    rolling = ds["spec"]["updateStrategy"]["rollingUpdate"]
    if c.node.settings.kubelet_minor >= 22:
        assert rolling.get("maxSurge") == 1 and rolling.get("maxUnavailable") == 0, rolling
    else:
        assert rolling.get("maxUnavailable") == 1 and "maxSurge" not in rolling, rolling
    [pod] = c.get_json("pods", "-n", NS, "-l", PLUGIN_LABEL)["items"]
    conds = {k["type"]: k["status"] for k in pod["status"].get("conditions") or []}
    assert conds.get("Ready") == "True", f"helm install --wait returned with the pod not Ready: {conds}"
    wait_for(lambda: allocatable(c) == {"kvm": 2, "tun": 3, "fuse": 2}, 60,
             f"allocatable from the chart's values (the node shows {allocatable(c)})")
    measures.append(f"[cluster 1.{c.node.settings.kubelet_minor}] helm install --wait: {took:.1f} s")


def test_helm_upgrade_changes_the_devices_without_restarting_the_pod(chart_cluster, measures):
    """3. `helm upgrade` with another resource list: the ConfigMap changes, the kubelet updates
    the mounted file and the plugin reloads it; the same pod, never restarted, serves the new
    list."""
    c = chart_cluster
    [before] = c.get_json("pods", "-n", NS, "-l", PLUGIN_LABEL)["items"]
    start = time.monotonic()
    helm(c, "upgrade", RELEASE, str(CHART), *settings(CONFIG_UPGRADED), "--wait", "--timeout", "180s")
    want = {"kvm": 3, "tun": 3, "zero": 1}
    wait_for(lambda: allocatable(c) == want, 120, f"allocatable {want} (the node shows {allocatable(c)})")
    took = time.monotonic() - start
    [after] = c.get_json("pods", "-n", NS, "-l", PLUGIN_LABEL)["items"]
    assert after["metadata"]["uid"] == before["metadata"]["uid"], "the upgrade replaced the pod"
    restarts = after["status"]["containerStatuses"][0]["restartCount"]
    assert restarts == 0, f"the plugin's container restarted {restarts} time(s)"
    measures.append(f"[cluster 1.{c.node.settings.kubelet_minor}] helm upgrade to the new allocatable, "
                    f"same pod: {took:.1f} s")


def test_helm_uninstall_leaves_nothing(chart_cluster):
    """4. `helm uninstall --wait`: every object of the release gone from the API, our pod gone,
    the node's allocatable at 0, and no socket, lock or CDI spec of ours on the host."""
    c = chart_cluster
    helm(c, "uninstall", RELEASE, "--namespace", NS, "--wait", "--timeout", "180s")
    wait_for(lambda: not c.get_json("pods", "-n", NS, "-l", PLUGIN_LABEL)["items"], 120, "our pod gone")
    assert not ours(c), f"left in the API after helm uninstall: {ours(c)}"
    wait_for(lambda: not allocatable(c), 60, "allocatable 0 for our resources")
    left = leftovers(c.node)
    assert not left, f"left on the host after helm uninstall: {left}"
