"""The DaemonSet's pod as operators deploy it: the one privilege it keeps, UID 0, is needed."""

import pytest

from framework.harness import RESOURCES
from framework.wait import wait_for


@pytest.mark.modes("pod")
def test_the_same_pod_without_uid_0_cannot_use_the_kubelets_directories(h):
    """The pod with runAsUser/runAsGroup 65534 is refused by the kubelet's root-owned
    directories ("Permission denied"), registers nothing and never becomes Ready."""
    h.plugin.restart(run_as=65534)
    line = wait_for(lambda: next((l for l in h.plugin.log_text().splitlines() if "Permission denied" in l), None),
                    30, 'the plugin as UID 65534 to log "Permission denied"')
    h.notes.append(f"[kubelet 1.{h.node.settings.kubelet_minor}, pod] as UID 65534: {line.split(' ', 3)[-1]}")
    assert all(h.plugin.registrations(r) == 0 for r in RESOURCES), "as UID 65534 it registered"
    assert not h.plugin.ready(), "as UID 65534 the plugin's pod is Ready"
