"""Real workloads through the plugin's devices, in the docs' own example pods: a KVM guest
runs, a packet goes through a TUN interface and is answered, a FUSE filesystem is mounted and
read. Beside each, the same pod without the request finds no device node; with CAP_MKNOD it makes
the node itself, and the kernel refuses the open (the device cgroup) for kvm and fuse, while runc's
built-in rules let every container use /dev/net/tun, so for tun only dropping CAP_MKNOD keeps a
pod that did not ask away from it."""

import pytest

from framework.workloads import WORKLOADS, device_cgroup

_noted = []


@pytest.mark.parametrize("resource", sorted(WORKLOADS))
def test_the_workload_runs_only_in_the_pod_that_asks(h, resource):
    program, path, _ = WORKLOADS[resource]
    if not _noted:
        _noted.append(True)
        h.notes.append(f"device cgroup on this node: {device_cgroup()}")
    granted, unasked, forged = (f"{resource}-{kind}" for kind in ("granted", "unasked", "mknod"))
    h.create_workload_pod(granted, resource, granted=True)
    h.create_workload_pod(unasked, resource, granted=False)
    h.create_workload_pod(forged, resource, granted=False, mknod="add")
    if resource == "tun":
        h.create_workload_pod("tun-nomknod", resource, granted=False, mknod="drop")

    ok = h.workload_outcome(granted, program)
    assert ok.ok, f"{granted}: {ok}"
    # The device cgroup gave this container read and write on the node (cgroup v1 shows it).
    if ok.facts.get("cgroup") == "v1":
        assert {"r", "w"} <= set(ok.facts["devices"]), ok
    if resource == "kvm":
        assert ok.facts["exit"] == "io" and ok.facts["then"] == "hlt", ok
        assert ok.facts["byte"] == ok.facts["want"], ok
    elif resource == "tun":
        assert ok.facts["reply"] == "10.99.0.1->10.99.0.2", ok
    else:
        assert ok.facts["read"].startswith("served by pid "), ok

    absent = h.workload_outcome(unasked, program)
    assert (absent.ok, absent.facts.get("at"), absent.facts.get("errno")) == (False, "open", "ENOENT"), absent
    assert absent.facts["node"] == "absent", absent

    made = h.workload_outcome(forged, program)
    assert made.facts.get("made", "").startswith(path + ":"), made
    if resource == "tun":
        # runc allows c 10:200 rwm in every container (all releases but 1.2.0 to 1.2.3).
        assert made.ok, f"runc's built-in tun rule no longer applies: {made}"
        if made.facts.get("cgroup") == "v1":
            assert made.facts["devices"] == "rwm", made
        dropped = h.workload_outcome("tun-nomknod", program)
        assert (dropped.ok, dropped.facts.get("at"), dropped.facts.get("errno")) == (False, "mknod", "EPERM"), dropped
        made_text = f"opened, runc's built-in rule (devices={made.facts.get('devices', '?')}); " \
                    f"with CAP_MKNOD dropped: mknod {dropped.facts['errno']}"
    else:
        assert (made.ok, made.facts.get("at"), made.facts.get("errno")) == (False, "open", "EPERM"), made
        if made.facts.get("cgroup") == "v1":
            assert made.facts["devices"] == "m", f"the device cgroup should allow only mknod: {made}"
        made_text = f"open {made.facts['errno']} (devices={made.facts.get('devices', '?')})"
    h.measure(f"{resource} workload: asked: {ok}; not asked: open {absent.facts['errno']}; "
              f"node made with CAP_MKNOD: {made_text}")
