"""The plugin and the kubelet restart independently of each other: the plugin registers again by
itself, running pods keep their devices, new pods get theirs, and nothing of ours is left behind."""

import threading
import time

import pytest

from framework.harness import RESOURCES, kubelet_events, ms, one_client_per_name, unhealthy_windows
from framework.plugin import COUNT, PluginProcess
from framework.pods import DOMAIN
from framework.wait import wait_for

# Nothing signals "no more registrations are coming": late ones get this long to show.
QUIET = 3


def assert_registered_once_each(h, before, what):
    """One kubelet start needs one registration per resource; a second leaves kubelet 1.20 with
    two endpoints and two ListAndWatch streams. In plugin-watcher runs kubelet.sock is not used."""
    time.sleep(QUIET)
    extra = {r: n - before[r] for r, n in h.registrations().items() if n - before[r] > 1}
    assert not extra, f"registered more than once for one {what}: {extra}"
    if h.plugin.mode in ("plugin-watcher", "pod"):
        assert not h.plugin.used_kubelet_socket(), "plugin-watcher mode, yet Register on kubelet.sock"


def test_after_a_kubelet_restart_the_plugin_registers_again_and_pods_keep_and_get_devices(h):
    h.create_pod("kr-before", "kvm")
    h.assert_sees("kr-before", "kvm")
    before = h.registrations()
    plugin_restarts = h.pod("kdp-plugin").container.restarts if h.plugin.mode == "pod" else 0
    h.node.stop_kubelet()
    h.node.start_kubelet()
    h.wait_registered_again(before)
    assert_registered_once_each(h, before, "kubelet restart")
    marks, seen = kubelet_events(h.node.kubelet_log(), RESOURCES)
    h.measure("kubelet restart, our endpoint registered: " + "; ".join(
        f"{r} {ms(marks.get('first'), seen.get(r))} after the kubelet started, "
        f"{ms(marks.get('manager'), seen.get(r))} after its device manager did" for r in RESOURCES))
    # the old pod: the same container, still running, still sees its device
    reports = len(h.reports("kr-before"))
    pod = h.wait_running("kr-before", 30)
    assert pod.container.restarts == 0, pod
    h.assert_sees("kr-before", "kvm", after=reports)
    h.create_pod("kr-after", "kvm")
    h.assert_sees("kr-after", "kvm")
    if h.plugin.mode == "pod":
        h.measure(f"plugin memory, after a kubelet restart: {h.plugin.memory()}")
        # The new kubelet probes the same container: Ready again, never restarted by liveness.
        h.plugin.wait_ready()
        plugin_pod = h.pod("kdp-plugin")
        assert plugin_pod.running and plugin_pod.container.restarts == plugin_restarts, plugin_pod


def test_after_a_plugin_restart_running_pods_keep_devices_and_new_pods_get_them(h):
    h.create_pod("pr-before", *RESOURCES)
    h.assert_sees("pr-before", *RESOURCES)
    h.plugin.stop()
    assert h.leftover_sockets() == [], "the plugin left sockets behind after SIGTERM"
    h.plugin.start()
    h.plugin.wait_registered(1)
    assert_registered_once_each(h, {r: 0 for r in RESOURCES}, "plugin start")
    reports = len(h.reports("pr-before"))
    pod = h.wait_running("pr-before", 30)
    assert pod.container.restarts == 0, pod
    h.assert_sees("pr-before", *RESOURCES, after=reports)
    h.create_pod("pr-after", *RESOURCES)
    h.assert_sees("pr-after", *RESOURCES)
    if h.plugin.mode == "pod":
        h.plugin.wait_ready()


def test_our_socket_deleted_by_a_cleanup_script_is_served_again_and_pods_keep_getting_devices(h):
    """A cleanup script deletes our kvm socket while the kubelet holds its stream: the plugin
    serves kvm again on the other slot's socket (kubelet 1.37 refuses, for good, a path whose
    client it has not torn down yet) and registers it; the kubelet lists kvm healthy again, the
    running pod keeps its device and a new one gets one."""
    h.create_pod("cs-before", "kvm")
    h.assert_sees("cs-before", "kvm")
    before = h.plugin.registrations("kvm")
    # The device plugin's socket, not the plugin watcher's registration socket.
    [socket] = [p for p in h.node.kubelet_dir.rglob("kdp-kvm*.sock")
                if p.parent.name != "plugins_registry"]
    socket.unlink()
    wait_for(lambda: h.plugin.registrations("kvm") > before, 30, "kvm registered again")
    assert not socket.exists(), "served again on the socket the kubelet held"
    h.wait_devices("kvm", COUNT)
    h.create_pod("cs-after", "kvm")
    h.assert_sees("cs-after", "kvm")
    assert h.pod("cs-before").container.restarts == 0


# How long device pods keep coming after the first instance has exited.
AFTER_HANDOVER = 5
# The longest the kubelet may go without a healthy device when it drops the second instance.
WINDOW_MS = 100


def test_a_second_instance_takes_over_as_in_a_surge_rollout_and_device_pods_keep_coming(h):
    """A surge rollout's handover: a second instance serves beside the first and registers, then
    the first stops (SIGTERM) while device pods are created one after another. Every pod is
    admitted, and the running one keeps its device. Kubelets 1.25 to 1.36 drop the second
    instance when the first one's stream ends: it registers again at once, once per resource,
    and the kubelet's time without a healthy device stays under WINDOW_MS (a pod that falls
    inside it is refused, so one may be); other kubelets keep the second's first registration."""
    if h.plugin.mode == "pod":
        pytest.skip("the cluster suite rolls the DaemonSet's pod out itself")
    minor = h.node.settings.kubelet_minor
    dropping = one_client_per_name(minor)
    h.create_pod("ho-before", "kvm")
    h.assert_sees("ho-before", "kvm")
    second = PluginProcess(h.node, h.plugin.mode, label="second")
    second.start()
    try:
        second.wait_registered(1)
        log = h.node.kubelet_log()
        since = log.stat().st_size
        stopping = threading.Thread(target=h.plugin.stop)
        admitted = refused = 0
        first_refusal = None
        stopping.start()
        done_at, n = None, 0
        while done_at is None or time.monotonic() - done_at < AFTER_HANDOVER:
            if done_at is None and not stopping.is_alive():
                done_at = time.monotonic()
            n += 1
            name = f"ho-{n}"
            h.create_pod(name, "tun")
            pod = h.wait_pod(name, lambda p: p.running or p.ended, "running or refused")
            if pod.running:
                admitted += 1
            else:
                refused += 1
                first_refusal = first_refusal or pod
            h.node.remove_manifest(name)
        stopping.join()
        # The kubelet holds the second instance's endpoints now.
        if dropping:
            second.wait_registered(2)
        h.create_pod("ho-after", *RESOURCES)
        h.assert_sees("ho-after", *RESOURCES)
        assert h.pod("ho-before").container.restarts == 0
        windows = {r: unhealthy_windows(log, f"{DOMAIN}/{r}", since) for r in RESOURCES}
        h.measure(f"handover to a second instance: {admitted} tun pods admitted, {refused} refused"
                  + (f" (first: {first_refusal})" if first_refusal else "")
                  + (f"; without a healthy device for {windows} ms" if dropping else ""))
        registered = {r: second.registrations(r) for r in RESOURCES}
        assert registered == {r: 2 if dropping else 1 for r in RESOURCES}, registered
        if dropping:
            late = {r: w for r, w in windows.items() if any(ms >= WINDOW_MS for ms in w)}
            assert not late, f"the kubelet went without a healthy device for {late} ms"
            assert refused <= 1, f"{refused} device pods refused in the handover"
        else:
            assert refused == 0, f"{refused} device pods refused in the handover: {first_refusal}"
    finally:
        # Back to the session's instance alone, started once the kubelet let go of both: the
        # same handover the other way round would leave it registered once or twice, as the
        # kubelet's timing falls.
        second.stop()
        h.plugin.stop()
        h.node.wait_watcher_let_go()
        h.plugin.start()
        h.plugin.wait_registered(1)
        h.delete_all_pods()

