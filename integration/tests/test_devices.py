"""Pods get exactly the devices they request, through the plugin on a real kubelet: each
built-in resource, none without a request, and no more than the count allows."""

import pytest

from framework.harness import DEV, numbers
from framework.plugin import COUNT, RESOURCES


@pytest.mark.parametrize("resource", RESOURCES)
def test_a_pod_requesting_a_device_sees_it_and_no_other(h, resource):
    h.create_pod(f"visible-{resource}", resource)
    h.assert_sees(f"visible-{resource}", resource)
    assert numbers(DEV[resource])  # the host's node exists, so "absent" would have been wrong


def test_a_pod_requesting_nothing_sees_no_device_node(h):
    h.create_pod("none")
    h.assert_sees("none")


def test_one_pod_more_than_the_count_is_refused_and_the_others_keep_running(h):
    names = [f"share-{i}" for i in range(1, COUNT + 1)]
    for n in names:
        h.create_pod(n, "kvm")
    for n in names:
        h.assert_sees(n, "kvm")
    h.create_pod("share-extra", "kvm")
    refused = h.wait_refused("share-extra")
    assert "devices.anza-labs.dev/kvm" in refused.message, refused
    for n in names:
        assert h.pod(n).running, f"{n} no longer runs: {h.pod(n)}"
