"""CDI: a resource with `cdi: true` gets a spec file from the plugin where containerd reads it,
and Allocate names the device instead of giving a DeviceSpec, so the device reaches the pod only
if the kubelet passes CDI names on and containerd injects them (kubelet 1.31+, containerd 2)."""

import json

import pytest

from framework.harness import RESOURCES

SPEC = "kdp-devices.anza-labs.dev_kvm.json"


def cdi_config(h):
    """kvm through CDI only (no DeviceSpecs), the other built-ins as usual."""
    path = h.node.root / "cdi-config" / "resources.yaml"
    path.parent.mkdir(exist_ok=True)
    lines = ["resources:"]
    for r in RESOURCES:
        lines += [f"  - name: {r}", f"    preset: {r}", "    count: 2"]
        if r == "kvm":
            lines.append("    cdi: true")
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.min_kubelet(31)
@pytest.mark.containerd2
@pytest.mark.modes("kubelet-socket", "plugin-watcher")
def test_a_device_given_only_by_cdi_name_reaches_the_pod_through_containerd(h):
    h.plugin.restart(config=cdi_config(h))
    h.plugin.wait_registered(1)
    spec_file = h.node.cdi_dir / SPEC
    spec = json.loads(spec_file.read_text())
    assert spec["kind"] == "devices.anza-labs.dev/kvm", spec
    assert [d["name"] for d in spec["devices"]] == ["kvm"], spec
    assert spec["devices"][0]["containerEdits"]["deviceNodes"][0]["hostPath"] == "/dev/kvm", spec
    h.create_pod("cdi-kvm", "kvm")
    h.assert_sees("cdi-kvm", "kvm")
    h.create_pod("cdi-tun", "tun")  # a DeviceSpec resource beside it is unchanged
    h.assert_sees("cdi-tun", "tun")
    h.plugin.stop()
    assert not spec_file.exists(), "the CDI spec outlived the plugin"
