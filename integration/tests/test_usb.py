"""USB devices by identity on a real kubelet: a resource that names a USB serial adapter by
vendor, product and serial, over a sysfs tree laid out as the kernel lays it out (--sys-root) and
a /dev root whose nodes are real character devices with the numbers the kernel gives USB devices
(189 for usb_device, 188 for ttyUSB). The adapter is plugged in after the plugin started: the
kubelet learns of it through ListAndWatch, and a pod requesting it sees both its nodes with the
right major:minor; the same adapter in another port keeps its device ID."""

import json
import os
import shutil
import stat
import time
from datetime import datetime, timezone

import pytest

# A resource name of its own in each mode: kubelet 1.20 ends a resource's new endpoint when the
# plugin watcher deregisters that resource's old socket a second later, which a run switching
# modes for one name would meet and no node does.
NAMES = {"kubelet-socket": "serial-ks", "plugin-watcher": "serial-pw"}


class FakeUsb:
    """sysfs entries and /dev nodes of USB devices, plugged and unplugged as the kernel does: the
    sysfs entry first, then devtmpfs's nodes; on unplug the nodes go first."""

    def __init__(self, sys_root, dev_root):
        self.sys, self.dev = sys_root, dev_root
        (sys_root / "bus/usb/devices").mkdir(parents=True, exist_ok=True)
        for bus in ("001", "002"):
            (dev_root / "bus/usb" / bus).mkdir(parents=True, exist_ok=True)

    def plug(self, port, serial, bus, devnum, tty, tty_minor):
        d = self.sys / "bus/usb/devices" / port
        (d / f"{port}:1.0" / tty / "tty" / tty).mkdir(parents=True)
        for name, value in (("idVendor", "0403"), ("idProduct", "6001"), ("serial", serial),
                            ("busnum", str(bus)), ("devnum", str(devnum))):
            (d / name).write_text(value + "\n")
        nodes = [(self.dev / f"bus/usb/{bus:03}/{devnum:03}", 189, (bus - 1) * 128 + devnum - 1),
                 (self.dev / tty, 188, tty_minor)]
        for path, major, minor in nodes:
            os.mknod(path, stat.S_IFCHR | 0o660, os.makedev(major, minor))
        return [p for p, _, _ in nodes]

    def unplug(self, port, nodes):
        for p in nodes:
            p.unlink()
        shutil.rmtree(self.sys / "bus/usb/devices" / port)


def numbers(path) -> str:
    rdev = os.stat(path).st_rdev
    return f"{os.major(rdev):x}:{os.minor(rdev):x}"


@pytest.mark.modes("kubelet-socket", "plugin-watcher")
def test_a_usb_adapter_named_by_serial_reaches_the_pod_with_its_nodes_and_keeps_its_id(h):
    resource = NAMES[h.plugin.mode]
    full, device_id = f"devices.anza-labs.dev/{resource}", f"{resource}-0403-6001-A12345-0"
    root = h.node.root / f"usb-{h.plugin.mode}"  # each run its own machine
    usb = FakeUsb(root / "sys", root / "dev")
    config = root / "resources.yaml"
    config.write_text(
        "resources:\n"
        f"  - name: {resource}\n"
        "    count: 1\n"
        "    devices:\n"
        '      - usb: {vendor: "0403", product: "6001", serial: "A12345"}\n')
    h.plugin.restart(config=config, dev_root=usb.dev, sys_root=usb.sys)
    h.plugin.wait_registered(1, resources=[resource])
    h.wait_devices(resource, 0)

    plugged = time.time()
    nodes = usb.plug("1-1.2", "A12345", 1, 4, "ttyUSB0", 0)
    h.wait_devices(resource, 1)
    listed = healthy_logged_at(h, full, plugged)
    # Another adapter of the model, with another serial: never ours.
    other = usb.plug("1-3", "B99999", 1, 5, "ttyUSB1", 1)

    probed = ["/dev/bus/usb/001/004", "/dev/ttyUSB0", "/dev/ttyUSB1"]
    h.create_pod("usb-serial", resource, probed=probed)
    h.wait_running("usb-serial")
    report = h.report("usb-serial")
    for container_path, host in zip(probed[:2], nodes):
        s = report.get(container_path)
        assert s is not None and s.kind == "character special file", report
        assert s.numbers == numbers(host), (container_path, s, numbers(host))
    assert report["/dev/ttyUSB1"].kind == "absent", report
    assert h.node.checkpoint_devices(full) == 1

    # Unplugged, then into another port: another bus, device number and tty, the same ID.
    h.delete_pods("usb-serial")
    usb.unplug("1-1.2", nodes)
    h.wait_devices(resource, 0)
    nodes = usb.plug("2-4", "A12345", 2, 9, "ttyUSB2", 2)
    h.wait_devices(resource, 1)
    assert device_id in checkpoint_ids(h, full), checkpoint_ids(h, full)
    h.create_pod("usb-replugged", resource, probed=["/dev/bus/usb/002/009", "/dev/ttyUSB2"])
    h.wait_running("usb-replugged")
    report = h.report("usb-replugged")
    assert report["/dev/ttyUSB2"].numbers == numbers(nodes[1]), report
    usb.unplug("1-3", other)
    usb.unplug("2-4", nodes)
    h.measure(f"USB hotplug: from plugging in (sysfs entry, then its two nodes) to the plugin "
              f"publishing the device Healthy: {(listed - plugged) * 1000:.1f} ms")


def healthy_logged_at(h, full: str, since: float) -> float:
    """When the plugin logged our device Healthy (it logs after publishing the new list), from
    its log's microsecond timestamps."""
    for line in h.plugin.log_text().splitlines():
        stamp, _, rest = line.partition(" ")
        if f"{full}:" not in rest or "Healthy" not in rest or "Unhealthy" in rest:
            continue
        try:
            t = datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc)
        except ValueError:
            continue
        if t.timestamp() >= since - 1:
            return t.timestamp()
    raise AssertionError(f"the plugin never logged {full} Healthy:\n{h.plugin.tail()}")


def checkpoint_ids(h, full: str) -> list:
    d = json.loads((h.node.device_plugins_dir / "kubelet_internal_checkpoint").read_text())
    return ((d.get("Data") or {}).get("RegisteredDevices") or {}).get(full) or []
