"""The node-reboot race (kubelet 1.27+ refuses, and never retries, a pod whose devices are not
registered when it is admitted): the node loses power with a device pod bound to it, and starts
again the way a real node does: containerd, then the kubelet, which starts its static pods and
admits the device pod at once. The plugin comes back as the DaemonSet's pod (started by that
kubelet), or, in the process modes, as a host service started before the kubelet (a systemd unit
ordered `Before=kubelet.service`). The scenario reports what the device pod saw and how long the
resource was missing; it fails only if the node does not recover: the pod settles (admitted, or
refused with UnexpectedAdmissionError), the plugin registers again, and a pod created afterwards
gets its device."""

import time

from framework.harness import RESOURCES, kubelet_events, ms


def test_after_a_node_reboot_the_plugin_is_back_and_what_a_bound_device_pod_sees(h):
    node = h.node
    h.create_pod("bound", "kvm", restartPolicy="Always")
    h.assert_sees("bound", "kvm")
    bound_uid = h.pod("bound").uid
    node.power_cut()
    node.start_containerd()
    if h.plugin.mode == "pod":
        how = "as the DaemonSet's pod"
    else:
        how = "as a process started before the kubelet"
        h.plugin.start()
    started = time.monotonic()
    node.start_kubelet()
    bound = h.wait_pod("bound", lambda p: p.running or p.phase == "Failed", "admitted or refused", 90)
    decided = time.monotonic() - started
    if h.plugin.mode == "pod":
        h.plugin.wait_ready(90)
    else:
        h.plugin.wait_registered(1, 60)
    marks, seen = kubelet_events(node.kubelet_log(), RESOURCES)
    assert bound.uid == bound_uid, "the bound pod came back under another UID"
    outcome = ("admitted and running" if bound.running else
               f"refused ({bound.reason}: {bound.message})")
    h.measure(f"node reboot, plugin {how}: the bound kvm pod was {outcome} "
              f"{decided:.1f} s after the kubelet started; kvm was missing for "
              f"{ms(marks.get('first'), seen.get('kvm'))} after the kubelet started "
              f"({ms(marks.get('manager'), seen.get('kvm'))} after its device manager did)")
    assert bound.running or bound.refused, f"the bound pod: {bound}"
    # A refused pod stays refused, the plugin registered or not: nothing admits it again. (A
    # quiet window: there is no event for "the kubelet did nothing".)
    if bound.refused:
        time.sleep(3)
        assert h.pod("bound").phase == "Failed", h.pod("bound")
    h.create_pod("after-reboot", "kvm")
    h.assert_sees("after-reboot", "kvm")
    if h.plugin.mode == "pod":
        # The kubelet queued the registration sockets left from before the power cut and, once
        # the plugin had replaced them, registered it through them; kubelet 1.20 then takes the
        # replaced sockets for new plugins a second later, unregisters (all devices Unhealthy)
        # and registers again. A pod admitted in that second is refused (seen in CI: the next
        # scenario's first pod). The next scenario gets a plugin registered once, cleanly.
        h.plugin.restart()
        h.plugin.wait_ready()
