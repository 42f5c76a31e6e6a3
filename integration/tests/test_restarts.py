"""The plugin and the kubelet restart independently of each other: the plugin registers again by
itself, running pods keep their devices, new pods get theirs, and nothing of ours is left behind."""

import time

from framework.harness import RESOURCES, kubelet_events, ms

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
