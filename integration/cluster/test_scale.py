"""DRA mode's cost to a cluster: FLEET instances of the driver, each standing for a node of its
own (its node name and Node object, its kubelet directory, its device nodes made with mknod),
against the cluster's real API server, with the RBAC the manifests give the driver and a token
the API server issued for its ServiceAccount. Measured: the time until every pool is published,
what the fleet asks of the API server while nothing changes and for one hotplug, how many watches
it holds, and each instance's RSS. The API server counts requests (`apiserver_request_total`)
without telling clients apart, so the same window is measured before the fleet starts too: what
the cluster's own components ask of those resources.

KDP_E2E_FLEET (default 10) instances and KDP_E2E_FLEET_IDLE seconds of quiet (default 30); the
figures in BENCHMARKS.md come from larger runs by hand, with KDP_E2E_FLEET_BIN the release
binary (else KDP_E2E_BENCH_BIN's, as CI passes the image's). Runs last (file order), on clusters from 1.36 as the DRA scenarios do."""

from __future__ import annotations

import json
import os
import re
import stat
import statistics
import time
from pathlib import Path

import pytest

from framework.cluster import APISERVER_PORT, NODE_IP
from framework.install import driver_credentials, remove_driver_rbac
from framework.pods import DOMAIN
from framework.wait import wait_for

FLEET = int(os.environ.get("KDP_E2E_FLEET", "10"))
IDLE = float(os.environ.get("KDP_E2E_FLEET_IDLE", "30"))
NS = "kubelet-device-plugins"
PREFIX = "fleet-"
COUNTED = ("resourceslices", "resourceclaims", "nodes")


@pytest.fixture(scope="module")
def fleet_api(cluster):
    """The driver's ServiceAccount, RBAC and a token for it; FLEET Node objects."""
    c = cluster
    if c.node.settings.kubelet_minor < 36:
        pytest.skip(f"DRA mode is proven from Kubernetes 1.36; this cluster is 1.{c.node.settings.kubelet_minor}")
    nodes = {"apiVersion": "v1", "kind": "List", "items": [
        {"apiVersion": "v1", "kind": "Node", "metadata": {"name": f"{PREFIX}{i}"}} for i in range(FLEET)]}
    c.kubectl("apply", "-f", "-", stdin=json.dumps(nodes))
    # Each instance holds an inotify instance, as on its own node; one machine's default limit
    # (128 for all of root's processes) would stand in for the fleet's size.
    limit = Path("/proc/sys/fs/inotify/max_user_instances")
    was = int(limit.read_text())
    if was < FLEET + 128:
        limit.write_text(str(FLEET + 128))
    creds = driver_credentials(c, c.node.root / "fleet" / "credentials")
    try:
        yield creds
    finally:
        limit.write_text(str(was))
        c.kubectl("delete", "nodes", *[f"{PREFIX}{i}" for i in range(FLEET)], "--wait=false",
                  "--ignore-not-found", check=False, timeout=120)
        c.kubectl("delete", "resourceslices", "--all", check=False, timeout=120)
        remove_driver_rbac(c)


def counts(c) -> dict[str, float]:
    """The API server's request counters for the resources the driver uses, by verb and resource;
    and the watches open on them now."""
    text = c.kubectl("get", "--raw", "/metrics").stdout
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = re.match(r'apiserver_request_total\{(.*)\} (\S+)$', line)
        if m:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
            if labels.get("resource") in COUNTED and not labels.get("subresource"):
                key = f"{labels['verb']} {labels['resource']}"
                out[key] = out.get(key, 0) + float(m.group(2))
        m = re.match(r'apiserver_longrunning_requests\{(.*)\} (\S+)$', line)
        if m:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
            if labels.get("verb") == "WATCH" and labels.get("resource") == "resourceslices":
                out["open watches"] = out.get("open watches", 0) + float(m.group(2))
    return out


def delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: after.get(k, 0) - before.get(k, 0) for k in sorted(set(before) | set(after))
            if k != "open watches" and after.get(k, 0) != before.get(k, 0)}


def fleet_slices(c) -> list[dict]:
    items = c.get_json("resourceslices")["items"]
    return [s for s in items if s["spec"].get("nodeName", "").startswith(PREFIX) and s["spec"]["driver"] == DOMAIN]


def rss_kib(pid: int) -> tuple[int, int]:
    """VmRSS (KiB) and threads of a process."""
    status = Path(f"/proc/{pid}/status").read_text()
    rss = int(re.search(r"VmRSS:\s+(\d+)", status).group(1))
    threads = int(re.search(r"Threads:\s+(\d+)", status).group(1))
    return rss, threads


def test_a_fleet_of_dra_drivers_publishes_and_then_asks_nothing(cluster, fleet_api, measures):
    c = cluster
    binary = Path(os.environ.get("KDP_E2E_FLEET_BIN") or os.environ.get("KDP_E2E_BENCH_BIN")
                  or c.node.settings.plugin_bin)
    zero = os.stat("/dev/zero").st_rdev
    env = {"KUBERNETES_SERVICE_HOST": NODE_IP, "KUBERNETES_SERVICE_PORT": str(APISERVER_PORT),
           "KDP_LOG_LEVEL": "info", "PATH": os.environ.get("PATH", "")}
    root = c.node.root / "fleet"
    # The cluster's own requests in a window as long as the fleet's, for comparison.
    base0 = counts(c)
    time.sleep(IDLE)
    baseline = delta(base0, counts(c))

    procs = []
    start = time.monotonic()
    try:
        for i in range(FLEET):
            d = root / f"n{i}"
            for sub in ("device-plugins", "plugins_registry", "dev", "cdi"):
                (d / sub).mkdir(parents=True, exist_ok=True)
            kvm = d / "dev" / "kvm"
            if not kvm.exists():
                os.mknod(kvm, stat.S_IFCHR | 0o666, zero)
            procs.append(c.node.spawn(f"fleet-{i}", [
                str(binary), "serve", "--mode", "dra", "--plugin-dir", str(d / "device-plugins"),
                "--dev-root", str(d / "dev"), "--resource", "kvm", "--count", "2",
                "--node-name", f"{PREFIX}{i}", "--credentials", str(fleet_api), "--cdi-dir", str(d / "cdi"),
            ], c.node.logs / f"fleet-{i}.log", env=env))
        wait_for(lambda: len(fleet_slices(c)) == FLEET or None, 120 + FLEET, f"{FLEET} pools published")
        published = time.monotonic() - start
        assert all(len(s["spec"]["devices"]) == 2 for s in fleet_slices(c))
        owned = sum(bool(s["metadata"].get("ownerReferences")) for s in fleet_slices(c))
        # A driver whose Node the API server was too busy to return publishes without its owner,
        # and looks again 15 s later.
        wait_for(lambda: all(s["metadata"].get("ownerReferences") for s in fleet_slices(c)) or None,
                 60, "every slice owned by its Node")

        # Quiet: nothing changes on any node.
        time.sleep(2)
        idle0 = counts(c)
        time.sleep(IDLE)
        idle1 = counts(c)
        idle = delta(idle0, idle1)
        watches = idle1.get("open watches", 0)

        # One hotplug: node 0's device node goes and comes back.
        kvm = root / "n0" / "dev" / "kvm"

        def tainted(want: bool):
            [s] = [s for s in fleet_slices(c) if s["spec"]["nodeName"] == f"{PREFIX}0"]
            return all(bool(d.get("taints")) == want for d in s["spec"]["devices"]) or None
        hot0 = counts(c)
        gone = time.monotonic()
        kvm.unlink()
        wait_for(lambda: tainted(True), 30, "node 0's devices tainted")
        taint_s = time.monotonic() - gone
        back = time.monotonic()
        os.mknod(kvm, stat.S_IFCHR | 0o666, zero)
        wait_for(lambda: tainted(False), 30, "node 0's taints gone")
        untaint_s = time.monotonic() - back
        hotplug = delta(hot0, counts(c))

        memory = [rss_kib(p.pid) for p in procs]
        assert all(p.alive() for p in procs), "an instance of the fleet exited"
    finally:
        for p in procs:
            p.stop(10)
    rss = sorted(m[0] for m in memory)
    threads = sorted(m[1] for m in memory)
    per_min = 60 / IDLE
    measures.append(
        f"[cluster 1.{c.node.settings.kubelet_minor}] DRA fleet of {FLEET} drivers ({binary.name} at {binary}): "
        f"every pool published {published:.2f} s after the first start ({owned} owned by their Node then, "
        f"all of them later); "
        f"idle {IDLE:.0f} s: requests {json.dumps(idle)} (the cluster alone in the same window before: "
        f"{json.dumps(baseline)}), so at most {sum(idle.values()) * per_min / FLEET:.2f} per node per minute; "
        f"{watches:.0f} watches open on resourceslices; one hotplug: taint in {taint_s:.2f} s, gone in "
        f"{untaint_s:.2f} s, requests {json.dumps(hotplug)}; RSS median {statistics.median(rss) / 1024:.1f} MiB "
        f"(min {rss[0] / 1024:.1f}, max {rss[-1] / 1024:.1f}), threads median {statistics.median(threads):.0f}")
    # Nothing changes, so no slice is written (nodes are written by the kubelet, never by us).
    writes = {k: v for k, v in idle.items()
              if k.split()[0] in ("POST", "PUT", "PATCH", "DELETE") and k.endswith(" resourceslices")}
    assert not writes, f"the idle fleet wrote: {writes}"
