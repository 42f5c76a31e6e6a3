"""Installed the way the README says, `kubectl apply -k`, on a one-node cluster of real
components: the DaemonSet controller creates our pod, `kubectl rollout status` waits on its
readiness probe, the scheduler places device pods by the node's allocatable, ConfigMap edits reach
the running pod, an update rolls, and `kubectl delete -k` leaves nothing behind.

The scenarios run in file order and share one install: each starts from what the one before it
left (the `installed` fixture applies the overlay again if an earlier one failed half-way).
"""

from __future__ import annotations

from datetime import datetime, timezone
import json
import time
from pathlib import Path

import pytest

from framework.harness import one_client_per_name, unhealthy_windows
from framework.install import (CONFIG, DS, IN_PLACE, NS, Install, expected, leftovers, pods, probe_pod,
                               seen, surge_supported, unschedulable)
from framework.pods import DOMAIN
from framework.wait import wait_for

# Scenario 3's edit: a count changed, a resource added, one removed.
CONFIG_RESOURCES = [r["name"] for r in CONFIG["resources"]]
CONFIG_EDITED = {"resources": [{"name": "kvm", "count": 3}, {"name": "tun", "count": 3},
                               {"name": "zero", "count": 1, "devices": [{"path": "/dev/zero"}]}]}


@pytest.fixture(scope="module")
def install(cluster, measures):
    return Install(cluster, measures)


@pytest.fixture
def installed(install):
    if not install.applied or not install.plugin_pods():
        install.write(CONFIG)
        install.apply()
        install.rollout()
    return install


def test_apply_rollout_allocatable(install):
    """1. `kubectl apply -k`, `rollout status` returning once the readiness probe passed, and
    every served resource in the node's allocatable with its count."""
    start = time.monotonic()
    install.apply()
    took = install.rollout()
    ready_at = time.monotonic() - start
    [pod] = install.plugin_pods()
    conds = {c["type"]: c["status"] for c in pod["status"].get("conditions") or []}
    assert conds.get("Ready") == "True", f"rollout status returned with the pod not Ready: {conds}"
    container = pod["spec"]["containers"][0]
    ready = (container.get("readinessProbe") or {}).get("exec", {}).get("command")
    alive = (container.get("livenessProbe") or {}).get("exec", {}).get("command")
    assert ready == ["/kubelet-device-plugins", "alive", "--ready"], f"readiness probe: {ready}"
    assert alive == ["/kubelet-device-plugins", "alive"], f"liveness probe: {alive}"
    after = install.expect_allocatable({"kvm": 2, "tun": 3, "fuse": 2})
    install.measure(f"apply -k to rollout status done: {ready_at:.1f} s (rollout status itself {took:.1f} s); "
                    f"allocatable right {after:.1f} s later")


def test_scheduler_places_by_allocatable(installed):
    """2. A Deployment asking for kvm scaled to count + 1: count pods run and see /dev/kvm, one
    stays Pending for the scheduler's Insufficient; a pod asking for nothing sees no device."""
    c = installed.c
    template = probe_pod("kvm-user", {"kvm": 1}, {"kdp-e2e": "kvm-users"})
    deployment = {"apiVersion": "apps/v1", "kind": "Deployment",
                  "metadata": {"name": "kvm-users", "namespace": "default"},
                  "spec": {"replicas": 3, "selector": {"matchLabels": {"kdp-e2e": "kvm-users"}},
                           "template": {"metadata": {"labels": {"kdp-e2e": "kvm-users"}},
                                        "spec": template["spec"]}}}
    c.kubectl("apply", "-f", "-", stdin=json.dumps(deployment))
    c.kubectl("apply", "-f", "-", stdin=json.dumps(probe_pod("no-request", {})))
    try:
        def settled():
            ps = pods(c, "kdp-e2e=kvm-users")
            running = [p for p in ps if p.running]
            pending = [p for p in ps if p.phase == "Pending"]
            return (running, pending) if len(running) == 2 and len(pending) == 1 else None
        running, [pending] = wait_for(settled, 120, "2 kvm pods running and 1 Pending")
        obj = c.get_json("pod", "-n", "default", pending.name)
        why = unschedulable(pending, obj)
        assert f"Insufficient {DOMAIN}/kvm" in why, f"the extra pod is Pending for: {why!r}"
        for p in running:
            assert seen(c, p.name) == expected("kvm"), f"{p.name} sees {seen(c, p.name)}"
        wait_for(lambda: any(p.running for p in pods(c, "kdp-e2e=no-request")), 60, "no-request running")
        assert seen(c, "no-request") == expected(), "a pod that asked for nothing sees a device node"
        assert not [p for p in pods(c, "kdp-e2e=kvm-users") if p.refused], "a kvm pod was refused by the kubelet"
    finally:
        c.kubectl("delete", "deployment", "kvm-users", "-n", "default", "--wait=true", check=False)
        c.kubectl("delete", "pod", "no-request", "-n", "default", "--wait=true", check=False)


def test_configmap_edit_reaches_running_pod(installed):
    """3. The ConfigMap changed and re-applied: allocatable follows (a count changed, a resource
    added, one removed) within the kubelet's ConfigMap sync, our pod not restarted."""
    [before] = installed.plugin_pods()
    installed.write(CONFIG_EDITED)
    applied_at = datetime.now(timezone.utc)
    installed.apply()
    try:
        took = installed.expect_allocatable({"kvm": 3, "tun": 3, "zero": 1}, timeout=120)
        [after] = installed.plugin_pods()
        assert after["metadata"]["uid"] == before["metadata"]["uid"], "the plugin's pod was replaced"
        restarts = after["status"]["containerStatuses"][0]["restartCount"]
        assert restarts == 0, f"the plugin's container restarted {restarts} time(s)"
        # When the plugin saw the new file: the kubelet's ConfigMap sync, apart from the Node
        # status update that follows it.
        logs = installed.c.kubectl("logs", "-n", NS, after["metadata"]["name"]).stdout
        reloads = [l.split()[0] for l in logs.splitlines() if "applying the configuration" in l]
        assert reloads, f"the plugin never logged a reload:\n{logs[-2000:]}"
        reloaded = datetime.fromisoformat(reloads[-1].replace("Z", "+00:00"))
        installed.measure(f"ConfigMap re-applied: the plugin reloaded {(reloaded - applied_at).total_seconds():.1f} s "
                          f"after the apply (the kubelet's ConfigMap sync); the Node's allocatable showed it "
                          f"{took:.1f} s after the apply")
    finally:
        installed.write(CONFIG)
        installed.apply()
        installed.expect_allocatable({"kvm": 2, "tun": 3, "fuse": 2}, timeout=120)


def rolling_update(install: Install, generation: str) -> tuple[int, int, int, float]:
    """An env var changed and applied while device pods keep arriving: one pod asking for tun
    at a time, created, run (or refused) and deleted, until the rollout is done and for 5 s after.
    Returns (admitted, refused while rolling, refused after, rollout seconds)."""
    c = install.c
    install.env["KDP_E2E_GENERATION"] = generation
    install.write(CONFIG)
    install.apply()
    rollout = c.spawn_kubectl("-n", NS, "rollout", "status", DS, "--timeout=180s")
    start = time.monotonic()
    admitted = refused = refused_after = 0
    done_at = None
    n = 0
    while done_at is None or time.monotonic() - done_at < 5:
        if done_at is None and rollout.poll() is not None:
            assert rollout.returncode == 0, f"rollout status failed: {rollout.communicate()}"
            done_at = time.monotonic()
        assert time.monotonic() - start < 240, "the rollout did not finish within 240 s"
        n += 1
        name = f"during-{generation}-{n}"
        after = done_at is not None
        c.kubectl("apply", "-f", "-", stdin=json.dumps(probe_pod(name, {"tun": 1})))
        p = wait_for(lambda: (lambda ps: ps[0] if ps and (ps[0].running or ps[0].refused or ps[0].ended)
                              else None)(pods(c, f"kdp-e2e={name}")), 120, f"{name} to run or be refused")
        if p.running:
            admitted += 1
        elif after:
            refused_after += 1
        else:
            refused += 1
        if not p.running and refused + refused_after == 1:
            install.measure(f"rollout {generation}: the first refusal: {p}")
        c.kubectl("delete", "pod", name, "-n", "default", "--wait=false")
    return admitted, refused, refused_after, (done_at or time.monotonic()) - start


# A hostile pod: 100 idle connections to the plugin's metrics port, each opened again a second
# after the plugin closes it, with stdin a FIFO nobody writes so that nc never sends or hangs up.
# The port holds 16 connections and closes the rest at once, so this keeps it full.
FLOOD = ("mkfifo /tmp/f && exec 3<>/tmp/f && for i in $(seq 100); do "
         "(while true; do nc @IP@ 9476 <&3 >/dev/null 2>&1; sleep 1; done) & done; wait")
# Longer than three liveness periods (failureThreshold 3, periodSeconds 30).
FLOOD_SECONDS = 100


def test_metrics_flood_neither_restarts_nor_unreadies_the_plugin(installed):
    """3b. A pod floods the metrics port, which the NetworkPolicy opens to every pod, for longer
    than three liveness periods: the plugin is not restarted, stays Ready, and a device pod
    created during the flood is admitted and sees its device."""
    c = installed.c
    [plugin] = installed.plugin_pods()
    ip = plugin["status"]["podIP"]
    restarts = plugin["status"]["containerStatuses"][0]["restartCount"]
    flood = probe_pod("flood", {})
    flood["spec"]["containers"][0]["command"] = ["/bin/sh", "-c", FLOOD.replace("@IP@", ip)]
    c.kubectl("apply", "-f", "-", stdin=json.dumps(flood))
    try:
        wait_for(lambda: any(p.running for p in pods(c, "kdp-e2e=flood")), 60, "the flood running")
        started = time.monotonic()
        c.kubectl("apply", "-f", "-", stdin=json.dumps(probe_pod("during-flood", {"kvm": 1})))
        not_ready = 0
        samples = 0
        while time.monotonic() - started < FLOOD_SECONDS:
            [now] = installed.plugin_pods()
            conds = {x["type"]: x["status"] for x in now["status"].get("conditions") or []}
            samples += 1
            not_ready += conds.get("Ready") != "True"
            assert now["status"]["containerStatuses"][0]["restartCount"] == restarts, \
                f"the plugin was restarted during the flood, after {time.monotonic() - started:.0f} s"
            time.sleep(5)  # observing a duration (three probe periods), not waiting for a state
        wait_for(lambda: any(p.running for p in pods(c, "kdp-e2e=during-flood")), 60, "during-flood running")
        assert seen(c, "during-flood") == expected("kvm"), "the pod created during the flood lacks its device"
        assert not_ready == 0, f"the plugin was not Ready in {not_ready} of {samples} samples"
        installed.measure(f"metrics flood of 100 connections for {FLOOD_SECONDS} s: 0 restarts, "
                          f"Ready in {samples} of {samples} samples, a device pod admitted meanwhile")
    finally:
        c.kubectl("delete", "pod", "flood", "during-flood", "-n", "default", "--wait=true", check=False)


# The longest the kubelet may go without a healthy device when it drops the new instance.
WINDOW_MS = 100


def test_update_keeps_device_pods_working(installed):
    """4. A DaemonSet update (an env var changed) with the manifests' strategy, maxSurge 1 (two
    instances of the plugin on the node at once; before 1.22, in place): the rollout completes,
    a device pod that was running keeps its device, device pods created during and after it are
    all admitted (before 1.22: all those created after it). Kubelets 1.25 to 1.36 drop the new
    instance when the old one's stream ends and refuse pods until it registers again: there, the
    kubelet's time without a healthy device must stay under WINDOW_MS, and one pod that falls in
    it may be refused."""
    c = installed.c
    surge = surge_supported(c)
    dropping = one_client_per_name(c.node.settings.kubelet_minor)
    c.kubectl("apply", "-f", "-", stdin=json.dumps(probe_pod("holder", {"kvm": 1})))
    try:
        wait_for(lambda: any(p.running for p in pods(c, "kdp-e2e=holder")), 60, "holder running")
        [old] = installed.plugin_pods()
        log = c.node.kubelet_log()
        since = log.stat().st_size
        admitted, refused, refused_after, took = rolling_update(installed, "2")
        [new] = installed.plugin_pods()
        assert new["metadata"]["uid"] != old["metadata"]["uid"], "the update did not replace our pod"
        windows = {r: unhealthy_windows(log, f"{DOMAIN}/{r}", since) for r in CONFIG_RESOURCES}
        installed.measure(f"rolling update ({'maxSurge 1' if surge else 'in place, maxUnavailable 1'}): "
                          f"rollout {took:.1f} s, {admitted} tun pods admitted, {refused} refused "
                          f"during it, {refused_after} after"
                          + (f"; the kubelet without a healthy device for {windows} ms" if dropping else ""))
        if dropping:
            late = {r: w for r, w in windows.items() if not w or any(ms >= WINDOW_MS for ms in w)}
            assert not late, f"the kubelet went without a healthy device for {late} ms"
            assert refused + refused_after <= 1, \
                f"{refused} device pod(s) refused during the surge rollout, {refused_after} after"
        else:
            assert refused_after == 0, f"{refused_after} device pod(s) refused after the rollout"
        if surge and not dropping:
            assert refused == 0, f"{refused} device pod(s) refused during the surge rollout"
        [holder] = pods(c, "kdp-e2e=holder")
        assert holder.running and holder.container.restarts == 0, f"holder: {holder}"
        assert seen(c, holder.name) == expected("kvm"), "the running pod lost its device"
    finally:
        c.kubectl("delete", "pod", "holder", "-n", "default", "--wait=true", check=False)


# The kubelet keeps a stopped endpoint's devices for this long (endpointStopGracePeriod) before
# it takes them out of the Node's capacity, and the Node status is written every 10 s.
GRACE_PERIOD = 5 * 60
STATUS_PERIOD = 10


def test_allocatable_holds_through_the_kubelets_grace_period_after_a_surge_update(installed):
    """4c. Kubelets 1.25 to 1.36 stop the new instance's endpoint when the old one's stream ends;
    had it not registered again, its devices would leave the Node's allocatable once the grace
    period is over. Watched from the old pod's exit until the period and one status update more
    have passed: the allocatable never changes, and a device pod is admitted at the end."""
    c = installed.c
    if not (surge_supported(c) and one_client_per_name(c.node.settings.kubelet_minor)):
        pytest.skip("only kubelets 1.25 to 1.36 stop the new instance's endpoint in a rollout")
    before = installed.allocatable()
    [old] = installed.plugin_pods()
    installed.env["KDP_E2E_GENERATION"] = "4"
    installed.write(CONFIG)
    installed.apply()
    installed.rollout()
    old_name = old["metadata"]["name"]
    wait_for(lambda: c.kubectl("get", "pod", "-n", NS, old_name, check=False).returncode != 0,
             120, "the old plugin pod gone")
    gone = time.monotonic()
    samples = 0
    while time.monotonic() - gone < GRACE_PERIOD + STATUS_PERIOD * 2:
        now = installed.allocatable()
        samples += 1
        assert now == before, \
            f"allocatable changed {time.monotonic() - gone:.0f} s after the old pod went: {now}, was {before}"
        time.sleep(5)
    held = time.monotonic() - gone
    name = "after-grace"
    c.kubectl("apply", "-f", "-", stdin=json.dumps(probe_pod(name, {"tun": 1})))
    try:
        p = wait_for(lambda: (lambda ps: ps[0] if ps and (ps[0].running or ps[0].ended) else None)(
            pods(c, f"kdp-e2e={name}")), 120, f"{name} to run or be refused")
        assert p.running, f"a device pod after the grace period: {p}"
    finally:
        c.kubectl("delete", "pod", name, "-n", "default", "--wait=false")
    installed.measure(f"after a surge update: allocatable {before} held {held:.0f} s after the old pod "
                      f"was gone ({samples} samples, 5 s apart; the kubelet's grace period is "
                      f"{GRACE_PERIOD} s), and a device pod was admitted then")


def test_update_in_place_leaves_a_gap(installed):
    """4b. Why the manifests surge: with maxUnavailable 1 the old pod is gone before the new one
    starts, and the kubelet refuses pods bound in between. Measured, not asserted, except that
    the rollout completes and nothing is refused once it has."""
    if not surge_supported(installed.c):
        pytest.skip("before 1.22 the update above is already in place")
    installed.strategy = IN_PLACE
    try:
        admitted, refused, refused_after, took = rolling_update(installed, "3")
        installed.measure(f"rolling update (in place, maxUnavailable 1): rollout {took:.1f} s, "
                          f"{admitted} tun pods admitted, {refused} refused during it, {refused_after} after")
        assert refused_after == 0, f"{refused_after} device pod(s) refused after the rollout"
    finally:
        installed.strategy = None
        installed.write(CONFIG)
        installed.apply()
        installed.rollout()
    assert len(installed.plugin_pods()) == 1


def test_manifests_pass_the_api_server(cluster):
    """6. (Before the delete: the namespace must exist.) Every kustomization in manifests/ meant
    for the release, dry-run on the server: nothing refused, no warning
    (Pod Security admission, deprecated fields and apiVersions all come back as warnings)."""
    root = Path(cluster.node.settings.manifests)
    dirs = [root] + sorted(p.parent for p in root.glob("overlays/*/kustomization.yaml"))
    if cluster.node.settings.kubelet_minor < 36:
        # resource.k8s.io/v1 (1.34) and DeviceClass extendedResourceName (on by default from 1.36).
        dirs.remove(root / "overlays/dra")
    if not surge_supported(cluster):
        # The base surges; before 1.22 the overlay that updates in place is the one to use.
        dirs = [root / "overlays/kubernetes-1.21"]
    problems = []
    for d in dirs:
        r = cluster.kubectl("apply", "-k", str(d), "--dry-run=server", check=False)
        if r.returncode != 0 or r.stderr.strip():
            problems.append(f"{d.relative_to(root.parent)}: {r.stderr.strip()}")
    assert not problems, "\n".join(problems)


def test_delete_leaves_nothing(installed):
    """5. `kubectl delete -k`: our pod goes, its sockets go, allocatable drops to 0, and nothing
    of ours stays on the host."""
    c, node = installed.c, installed.c.node
    start = time.monotonic()
    c.kubectl("delete", "-k", str(installed.dir), "--wait=true", timeout=180)
    wait_for(lambda: not c.get_json("pods", "-n", NS)["items"] if c.kubectl(
        "get", "ns", NS, check=False).returncode == 0 else True, 120, "our pods gone")
    installed.applied = False
    wait_for(lambda: not installed.allocatable(), 60, "allocatable 0 for our resources")
    gone = time.monotonic() - start
    left = leftovers(node)
    assert not left, f"left on the host after delete -k: {left}"
    installed.measure(f"delete -k to allocatable 0: {gone:.1f} s")
