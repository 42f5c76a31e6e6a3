"""Device health as the kubelet sees it: a device node removed from --dev-root makes the kubelet
refuse new pods for that resource, and admit them again once it is back; on kubelets with
KEP-4680 the consuming pod's status shows the device Unhealthy, then Healthy."""

import time

import pytest

from framework.plugin import COUNT, RESOURCES
from framework.wait import wait_for


def start_on_test_nodes(h):
    for r in RESOURCES:
        h.make_test_node(r)
    h.plugin.restart(dev_root=h.node.devroot)
    h.plugin.wait_registered(1)
    h.wait_devices("kvm", COUNT)


def test_a_removed_device_node_is_refused_then_admitted_when_back(h):
    start_on_test_nodes(h)
    h.create_pod("rm-baseline", "kvm")
    h.assert_sees("rm-baseline", "kvm")
    h.delete_pods("rm-baseline")

    (h.node.devroot / "kvm").unlink()
    h.wait_devices("kvm", 0)
    h.create_pod("rm-gone", "kvm")
    h.wait_refused("rm-gone")
    h.create_pod("rm-other", "tun")  # the other resources are unaffected
    h.assert_sees("rm-other", "tun")
    h.delete_pods("rm-gone", "rm-other")

    h.make_test_node("kvm")
    h.wait_devices("kvm", COUNT)
    h.create_pod("rm-back", "kvm")
    h.assert_sees("rm-back", "kvm")


@pytest.mark.min_kubelet(36)
def test_an_unhealthy_device_shows_in_the_consuming_pods_status_then_healthy_again(h):
    """KEP-4680 (on by default from 1.36): the kubelet reports the health of each device a
    container was given in status.containerStatuses[].allocatedResourcesStatus."""
    start_on_test_nodes(h)
    h.create_pod("health", "kvm")
    h.assert_sees("health", "kvm")
    full = "devices.anza-labs.dev/kvm"

    def health() -> set:
        pod = h.pod("health")
        return set((pod.container.resources_health.get(full) or {}).values()) if pod else set()

    wait_for(lambda: health() == {"Healthy"}, 30, "the pod's status to show its kvm device Healthy")
    gone = time.monotonic()
    (h.node.devroot / "kvm").unlink()
    wait_for(lambda: health() == {"Unhealthy"}, 60, "the pod's status to show its kvm device Unhealthy")
    unhealthy = time.monotonic() - gone
    back = time.monotonic()
    h.make_test_node("kvm")
    wait_for(lambda: health() == {"Healthy"}, 60, "the pod's status to show its kvm device Healthy again")
    healthy = time.monotonic() - back
    assert h.pod("health").running, h.pod("health")
    h.measure(f"allocatedResourcesStatus: Unhealthy {unhealthy * 1000:.0f} ms after the node was "
              f"removed, Healthy {healthy * 1000:.0f} ms after it was back")
