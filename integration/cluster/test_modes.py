"""DRA mode on a cluster of each release from 1.36 (real kube-apiserver, scheduler,
controller-manager, kubelet and containerd 2): `kubectl apply -k manifests/overlays/dra`, and the
same devices reach pods through Dynamic Resource Allocation. Our ResourceSlices list them; a pod
that asks for `devices.anza-labs.dev/kvm` (no claim in its spec) gets /dev/kvm through the
DeviceClass's extended resource name, and the docs' example pods run their real workloads (a
KVM guest, a TUN packet, a FUSE mount) that way; a pod with a claim from a template gets one;
claims beyond the devices stay Pending; a device node removed becomes a taint; a plugin restart keeps the
running pods' devices and prepares no claim twice; and a node switches from DRA to the device
plugin and back. Runs after test_install.py (file order), which leaves the cluster without us.

Needs Kubernetes 1.36 or later: DeviceClass extendedResourceName (DRAExtendedResource), device
taints (DRADeviceTaints) and resource health (ResourceHealthStatus) are beta and on by default
there, GA or beta in 1.37; on 1.34 and 1.35 all three are alpha and off. Skipped on older ones.
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import threading
import time
from pathlib import Path

import pytest

from framework.cluster import APISERVER_PORT, NODE_IP
from framework.install import CONFIG, DS, NS, Install, expected, pods, probe_pod, seen, unschedulable
from framework.node import BUSYBOX_IMAGE, NODE_NAME
from framework.pods import DOMAIN, Pod
from framework.wait import wait_for
from framework.workloads import WORKLOADS, Outcome, finished_outcome, workload_pod

# A device node of our own in the host's /dev (which the node and our pod share), to remove.
SCRATCH = "/dev/kdp-e2e-scratch"
DRA_CONFIG = {"mode": "dra", "resources": CONFIG["resources"] + [
    {"name": "scratch", "count": 1, "devices": [{"path": SCRATCH}]}]}
SELECTOR = f"spec.nodeName={NODE_NAME},spec.driver={DOMAIN}"
TAINT = f"{DOMAIN}/unhealthy"


@pytest.fixture(scope="module")
def dra(cluster, measures):
    if cluster.node.settings.kubelet_minor < 36:
        pytest.skip(f"DRA mode is proven from Kubernetes 1.36 (DeviceClass extendedResourceName); "
                    f"this cluster is 1.{cluster.node.settings.kubelet_minor}")
    make_scratch()
    d = Install(cluster, measures, overlay="dra", config=DRA_CONFIG)
    # No kube-proxy here: the pod reaches the API server at the node's address, as a
    # kubeconfig-less in-cluster client does through the `kubernetes` Service elsewhere.
    d.env.update({"KUBERNETES_SERVICE_HOST": NODE_IP, "KUBERNETES_SERVICE_PORT": str(APISERVER_PORT)})
    d.write(DRA_CONFIG)
    try:
        yield d
    finally:
        delete_device_pods(cluster)
        cluster.kubectl("delete", "-k", str(d.dir), "--wait=true", "--ignore-not-found", check=False,
                        timeout=180)
        cluster.kubectl("delete", "deviceclass", "scratch.devices.anza-labs.dev", "--ignore-not-found",
                        check=False)
        if os.path.lexists(SCRATCH):
            os.unlink(SCRATCH)


@pytest.fixture(scope="module")
def draclient(dra) -> Path:
    """integration/peers/draclient: the kubelet's own DRA client (k8s.io/kubelet), built from
    the Go modules integration/go.mod pins."""
    out = dra.c.node.root / "draclient"
    here = Path(__file__).resolve().parent.parent
    r = subprocess.run(["go", "build", "-mod=readonly", "-o", str(out), "./peers/draclient"], cwd=here,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"go build ./peers/draclient: {r.stderr}"
    return out


def dra_socket(d: Install) -> Path:
    """Our plugin pod's DRAPlugin socket, named after its pod UID's first 8 hex digits (so that
    a rolling update's two pods each have one)."""
    [pod] = d.plugin_pods()
    tag = pod["metadata"]["uid"][:8]
    return d.c.node.kubelet_dir / f"plugins/kubelet-device-plugins/kdp-dra~{tag}.sock"


def call_driver(d: Install, client: Path, version: str, verb: str, *claims: dict) -> dict:
    """A DRAPlugin call on our socket, as the kubelet makes it; the answer's claims by UID."""
    socket = dra_socket(d)
    refs = [f"{m['namespace']}/{m['name']}/{m['uid']}" for m in claims]
    r = subprocess.run([str(client), "-socket", str(socket), "-version", version, verb, *refs],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"draclient {version} {verb}: {r.stderr}"
    return json.loads(r.stdout).get("claims") or {}


def make_scratch() -> None:
    """SCRATCH as a character device node with /dev/zero's numbers."""
    zero = os.stat("/dev/zero")
    tmp = SCRATCH + ".tmp"
    if os.path.lexists(tmp):
        os.unlink(tmp)
    os.mknod(tmp, stat.S_IFCHR | 0o666, zero.st_rdev)
    os.rename(tmp, SCRATCH)


def delete_device_pods(c) -> None:
    c.kubectl("delete", "pods", "-n", "default", "-l", "kdp-e2e", "--wait=true", "--ignore-not-found",
              check=False, timeout=120)
    c.kubectl("delete", "resourceclaimtemplates", "--all", "-n", "default", "--ignore-not-found",
              check=False)


def slices(c) -> list[dict]:
    return c.get_json("resourceslices", "--field-selector", SELECTOR)["items"]


def devices(c) -> dict[str, dict]:
    """Our devices in our node's pool, by name, from the newest generation only."""
    items = slices(c)
    if not items:
        return {}
    newest = max(s["spec"]["pool"]["generation"] for s in items)
    return {d["name"]: d for s in items if s["spec"]["pool"]["generation"] == newest
            for d in s["spec"].get("devices") or []}


def resource_of(device: dict) -> str:
    return device.get("attributes", {}).get("resource", {}).get("string", "")


def wait_running(c, name: str, timeout: float = 120) -> dict:
    def running():
        obj = c.get_json("pod", "-n", "default", name)
        ps = pods(c, f"kdp-e2e={name}")
        if ps and (ps[0].refused or ps[0].ended):
            raise AssertionError(f"{name} did not start: {ps[0]}")
        return obj if ps and ps[0].running else None
    try:
        return wait_for(running, timeout, f"{name} running")
    except AssertionError as e:
        obj = c.get_json("pod", "-n", "default", name)
        raise AssertionError(f"{e}: {json.dumps(obj.get('status'))[:1500]}") from None


def wait_unschedulable(c, name: str, timeout: float = 60) -> str:
    """Until the scheduler says why it cannot place the pod; the reason."""
    def why():
        obj = c.get_json("pod", "-n", "default", name)
        [p] = pods(c, f"kdp-e2e={name}")
        return unschedulable(p, obj) or None
    return wait_for(why, timeout, f"{name} to be unschedulable")


def claim_of(c, pod: dict) -> dict:
    """The ResourceClaim the scheduler made for the pod's extended resource."""
    status = pod["status"].get("extendedResourceClaimStatus") or {}
    name = status.get("resourceClaimName")
    assert name, f"the pod has no extended resource claim: {json.dumps(pod['status'])[:800]}"
    return c.get_json("resourceclaim", "-n", "default", name)


def plugin_log(d: Install) -> str:
    [pod] = d.plugin_pods()
    return d.c.kubectl("logs", "-n", NS, pod["metadata"]["name"]).stdout


def prepared_uids(log: str) -> list[str]:
    """Claims the plugin prepared (not those it answered from its checkpoint, nor released)."""
    return re.findall(r"\] prepared claim \S+ \(([0-9a-f-]+)\)", log)


def test_dra_slices_list_our_devices(dra):
    """1. Applied and rolled out: our node's ResourceSlices list every device slot of every
    resource with its attributes, and the node's allocatable offers none of them (the scheduler
    uses DRA for a resource only where no device plugin offers it)."""
    c = dra.c
    start = time.monotonic()
    dra.apply()
    dra.rollout()
    want = {"kvm": 2, "tun": 3, "fuse": 2, "scratch": 1}

    def listed():
        counts: dict[str, int] = {}
        for dev in devices(c).values():
            counts[resource_of(dev)] = counts.get(resource_of(dev), 0) + 1
        return counts == want
    try:
        wait_for(listed, 60, f"our ResourceSlices to list {want}")
    except AssertionError as e:
        raise AssertionError(f"{e}: {json.dumps(slices(c))[:2000]}\n{plugin_log(dra)[-3000:]}") from None
    took = time.monotonic() - start
    kvm = devices(c)["kvm-0"]
    attrs = kvm["attributes"]
    rdev = os.stat("/dev/kvm").st_rdev
    assert attrs["path"] == {"string": "/dev/kvm"}, attrs
    assert attrs["major"] == {"int": os.major(rdev)} and attrs["minor"] == {"int": os.minor(rdev)}, attrs
    assert not kvm.get("taints"), f"a healthy device is tainted: {kvm}"
    [s] = slices(c)
    assert s["spec"]["pool"]["name"] == NODE_NAME
    assert [o["kind"] for o in s["metadata"].get("ownerReferences") or []] == ["Node"]
    assert not dra.allocatable(), f"the node offers our resources as a device plugin: {dra.allocatable()}"
    dra.measure(f"DRA: apply -k to our devices in the node's ResourceSlices: {took:.1f} s")


def test_dra_driver_may_write_only_its_own_nodes_slices(dra):
    """1a. The admission policy: with a token of our ServiceAccount bound to our pod (as the
    kubelet mounts it), a slice of our node is accepted and one of another node is refused with
    the policy's message; so is one of another driver. RBAC alone would allow all three."""
    c = dra.c
    if not dra.applied:  # run alone (-k): install as scenario 1 does
        dra.apply()
        dra.rollout()
    [pod] = dra.plugin_pods()
    token = c.kubectl("create", "token", "kubelet-device-plugins", "-n", NS, "--duration=10m",
                      "--bound-object-kind=Pod", f"--bound-object-name={pod['metadata']['name']}",
                      f"--bound-object-uid={pod['metadata']['uid']}").stdout.strip()
    as_plugin = c.token_kubeconfig("dra-plugin", token)

    def slice_for(node: str, driver: str = DOMAIN) -> str:
        return json.dumps({"apiVersion": "resource.k8s.io/v1", "kind": "ResourceSlice",
                           "metadata": {"generateName": "kdp-e2e-policy-"},
                           "spec": {"driver": driver, "nodeName": node,
                                    "pool": {"name": node, "generation": 1, "resourceSliceCount": 1},
                                    "devices": []}})
    # Server-side dry runs: admission decides as for a real write, and nothing is stored, so the
    # plugin (which owns every slice of its driver on its node) never sees one to tidy away.
    def create(node: str, driver: str = DOMAIN):
        return c.kubectl("create", "--dry-run=server", "-f", "-", stdin=slice_for(node, driver), check=False,
                         kubeconfig=as_plugin)
    other = create("another-node")
    assert other.returncode != 0 and "may only write ResourceSlices of its own node" in other.stderr, \
        f"a slice of another node: {other.returncode} {other.stdout} {other.stderr}"
    foreign = create(NODE_NAME, "gpu.example.com")
    assert foreign.returncode != 0 and "of its own driver" in foreign.stderr, \
        f"a slice of another driver: {foreign.returncode} {foreign.stdout} {foreign.stderr}"
    own = create(NODE_NAME)
    assert own.returncode == 0 and "created (server dry run)" in own.stdout, \
        f"a slice of our node: {own.returncode} {own.stdout} {own.stderr}"


def test_dra_configmap_edit_republishes(dra):
    """1b. The ConfigMap edited (kvm's count 2 to 3) and applied: the plugin reloads it without a
    restart and publishes the new devices under a higher pool generation; edited back, the
    third device goes again."""
    c = dra.c
    [before] = dra.plugin_pods()
    generation = max(s["spec"]["pool"]["generation"] for s in slices(c))
    edited = json.loads(json.dumps(DRA_CONFIG))
    edited["resources"][0]["count"] = 3
    dra.write(edited)
    dra.apply()
    try:
        start = time.monotonic()
        wait_for(lambda: "kvm-2" in devices(c), 180, "kvm-2 in our ResourceSlices")
        took = time.monotonic() - start
        now = max(s["spec"]["pool"]["generation"] for s in slices(c))
        assert now > generation, f"the pool's generation stayed at {generation}"
        [after] = dra.plugin_pods()
        assert after["metadata"]["uid"] == before["metadata"]["uid"], "the plugin's pod was replaced"
        assert "applying the configuration" in plugin_log(dra)
        dra.measure(f"DRA: ConfigMap re-applied to the new device in our ResourceSlices: {took:.1f} s "
                    f"(the kubelet's ConfigMap sync)")
    finally:
        dra.write(DRA_CONFIG)
        dra.apply()
        wait_for(lambda: devices(c) and "kvm-2" not in devices(c), 180, "kvm-2 gone again")


def test_dra_workloads_run_through_their_claims(dra):
    """1c. The docs' example pods, unchanged but for the image, run their real workloads
    through DRA claims the scheduler makes for their extended resources: a KVM guest, a packet
    through a TUN interface, a FUSE filesystem mounted and read. The kvm pod without the request
    that makes /dev/kvm itself (CAP_MKNOD) is refused by the kernel, as in device plugin mode."""
    c = dra.c
    outcomes = {}
    try:
        for resource in sorted(WORKLOADS):
            apply_workload_pod(c, f"dra-{resource}-workload", resource, granted=True)
        apply_workload_pod(c, "dra-kvm-mknod", "kvm", granted=False, mknod="add")
        for resource, (program, _, _) in sorted(WORKLOADS.items()):
            name = f"dra-{resource}-workload"
            outcomes[resource] = got = workload_outcome(c, name, program)
            assert got.ok, f"{name}: {got}"
            # The claim the scheduler made went with the finished pod: our log names it.
            status = c.get_json("pod", "-n", "default", name)["status"].get("extendedResourceClaimStatus") or {}
            claim = status.get("resourceClaimName")
            assert claim, f"{name} ran without an extended resource claim: {status}"
            assert f"] prepared claim default/{claim} (" in plugin_log(dra), f"we never prepared {claim}"
        made = workload_outcome(c, "dra-kvm-mknod", "kvm-guest")
        assert (made.ok, made.facts.get("at"), made.facts.get("errno")) == (False, "open", "EPERM"), made
        dra.measure("DRA workloads: " + "; ".join(str(o) for o in outcomes.values()) +
                    f"; kvm not asked, node made with CAP_MKNOD: open {made.facts['errno']}")
    finally:
        c.kubectl("delete", "pods", "-n", "default", "-l", "kdp-e2e-workload", "--wait=true",
                  "--ignore-not-found", check=False, timeout=120)


def apply_workload_pod(c, name: str, resource: str, **how) -> None:
    pod = workload_pod(resource, name, BUSYBOX_IMAGE, **how)
    pod["metadata"]["labels"] = {"kdp-e2e-workload": name}
    c.kubectl("apply", "-f", "-", stdin=json.dumps(pod))


def workload_outcome(c, name: str, program: str, timeout: float = 120) -> Outcome:
    """Once the pod has finished: the line its workload printed (`kubectl logs`)."""
    def finished():
        phase = c.get_json("pod", "-n", "default", name).get("status", {}).get("phase")
        return phase if phase in ("Succeeded", "Failed") else None
    try:
        phase = wait_for(finished, timeout, f"{name} to finish")
    except AssertionError as e:
        obj = c.get_json("pod", "-n", "default", name)
        raise AssertionError(f"{e}: {json.dumps(obj.get('status'))[:1500]}") from None
    return finished_outcome(name, phase, c.kubectl("logs", "-n", "default", name).stdout, program)


def test_dra_extended_resource_pod_gets_kvm(dra):
    """2. A pod that asks for devices.anza-labs.dev/kvm, as pods always have (no claim in its
    spec), runs and sees /dev/kvm through a claim the scheduler made for it; a pod that asks for
    nothing sees no device."""
    c = dra.c
    c.kubectl("apply", "-f", "-", stdin=json.dumps(probe_pod("dra-kvm", {"kvm": 1})))
    c.kubectl("apply", "-f", "-", stdin=json.dumps(probe_pod("dra-none", {})))
    pod = wait_running(c, "dra-kvm")
    assert seen(c, "dra-kvm") == expected("kvm"), f"dra-kvm sees {seen(c, 'dra-kvm')}"
    claim = claim_of(c, pod)
    [result] = claim["status"]["allocation"]["devices"]["results"]
    assert result["driver"] == DOMAIN and result["pool"] == NODE_NAME, result
    assert result["device"] in ("kvm-0", "kvm-1"), result
    wait_running(c, "dra-none")
    assert seen(c, "dra-none") == expected(), "a pod that asked for nothing sees a device node"
    assert claim["metadata"]["uid"] in prepared_uids(plugin_log(dra))


def apply_pod_with_template_claim(c, pod_name: str, resource: str) -> None:
    """A ResourceClaimTemplate `<resource>-template` of our DeviceClass for `resource`, and a probe
    pod whose container names a claim made from it (as DRA-native workloads ask)."""
    template = {"apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaimTemplate",
                "metadata": {"name": f"{resource}-template", "namespace": "default"},
                "spec": {"spec": {"devices": {"requests": [
                    {"name": resource, "exactly": {"deviceClassName": f"{resource}.{DOMAIN}"}}]}}}}
    c.kubectl("apply", "-f", "-", stdin=json.dumps(template))
    pod = probe_pod(pod_name, {})
    pod["spec"]["resourceClaims"] = [{"name": resource, "resourceClaimTemplateName": f"{resource}-template"}]
    pod["spec"]["containers"][0]["resources"] = {"claims": [{"name": resource}]}
    c.kubectl("apply", "-f", "-", stdin=json.dumps(pod))


def test_dra_claim_template_pod_gets_a_device(dra):
    """3. A pod with a ResourceClaim from a ResourceClaimTemplate of our DeviceClass gets the
    device, as DRA-native workloads ask."""
    c = dra.c
    apply_pod_with_template_claim(c, "dra-template", "kvm")
    wait_running(c, "dra-template")
    assert seen(c, "dra-template") == expected("kvm"), f"dra-template sees {seen(c, 'dra-template')}"


def test_dra_claims_beyond_the_devices_stay_pending(dra):
    """4. Both kvm devices are taken (scenarios 2 and 3): a third kvm pod stays Pending with the
    scheduler's reason, and runs once a device is released."""
    c = dra.c
    c.kubectl("apply", "-f", "-", stdin=json.dumps(probe_pod("dra-third", {"kvm": 1})))
    why = wait_unschedulable(c, "dra-third")
    assert "kvm" in why or "devices" in why or "claim" in why, f"Pending for: {why!r}"
    assert not next(iter(pods(c, "kdp-e2e=dra-third"))).running
    c.kubectl("delete", "pod", "dra-template", "-n", "default", "--wait=true")
    wait_running(c, "dra-third", timeout=180)
    assert seen(c, "dra-third") == expected("kvm")


def test_dra_removed_device_node_is_a_taint(dra):
    """5. A device node removed from the host: its device carries our taint in the slice, and a
    pod asking for it stays Pending; back, the taint goes and the pod runs."""
    c = dra.c
    scratch_class(c)
    [name] = [n for n, d in devices(c).items() if resource_of(d) == "scratch"]
    os.unlink(SCRATCH)
    try:
        start = time.monotonic()
        tainted = wait_for(lambda: [t for t in devices(c).get(name, {}).get("taints") or []
                                    if t["key"] == TAINT] or None, 30, f"{name} tainted")
        took = time.monotonic() - start
        assert tainted[0]["effect"] == "NoSchedule", tainted
        c.kubectl("apply", "-f", "-", stdin=json.dumps(probe_pod("dra-scratch", {"scratch": 1})))
        why = wait_unschedulable(c, "dra-scratch")
        dra.measure(f"DRA: device node removed to taint in the slice: {took:.2f} s; the pod: {why[:120]}")
    finally:
        make_scratch()
    wait_for(lambda: name in devices(c) and not devices(c)[name].get("taints"), 30, f"{name} untainted")
    wait_running(c, "dra-scratch", timeout=180)
    c.kubectl("delete", "pod", "dra-scratch", "-n", "default", "--wait=true")


def scratch_class(c) -> None:
    """A DeviceClass of the scratch device (the overlay's classes cover the default resources)."""
    cls = {"apiVersion": "resource.k8s.io/v1", "kind": "DeviceClass",
           "metadata": {"name": f"scratch.{DOMAIN}"},
           "spec": {"extendedResourceName": f"{DOMAIN}/scratch", "selectors": [{"cel": {"expression":
                    f'device.driver == "{DOMAIN}" && device.attributes["{DOMAIN}"].resource == "scratch"'}}]}}
    c.kubectl("apply", "-f", "-", stdin=json.dumps(cls))


def test_dra_unhealthy_device_shows_in_the_claiming_pods_status(dra):
    """5b. KEP-4680 for DRA: the kubelet reads our DRAResourceHealth stream and shows the health
    of each device of a container's claims in its allocatedResourcesStatus. The device node
    removed under a running pod: Unhealthy (the pod keeps running: our taint is NoSchedule);
    back: Healthy. (Only claims named in the container's spec are reported, so the pod's claim
    comes from a template here.)"""
    c = dra.c
    scratch_class(c)
    apply_pod_with_template_claim(c, "dra-health", "scratch")
    wait_running(c, "dra-health")

    def health() -> set[str]:
        [p] = pods(c, "kdp-e2e=dra-health")
        return {h for name, devices in p.container.resources_health.items() if name.startswith("claim:")
                for h in devices.values()}
    try:
        wait_for(lambda: health() == {"Healthy"}, 60, "the pod's status to show its device Healthy")
    except AssertionError as e:
        raise AssertionError(f"{e}: {health()}\n{plugin_log(dra)[-2000:]}") from None
    os.unlink(SCRATCH)
    try:
        gone = time.monotonic()
        wait_for(lambda: health() == {"Unhealthy"}, 60, "the pod's status to show its device Unhealthy")
        unhealthy = time.monotonic() - gone
    finally:
        make_scratch()
    back = time.monotonic()
    wait_for(lambda: health() == {"Healthy"}, 60, "the pod's status to show its device Healthy again")
    healthy = time.monotonic() - back
    [p] = pods(c, "kdp-e2e=dra-health")
    assert p.running and p.container.restarts == 0, f"dra-health: {p}"
    dra.measure(f"DRA: allocatedResourcesStatus of a claim: Unhealthy {unhealthy:.2f} s after the node "
                f"was removed, Healthy {healthy:.2f} s after it was back")
    c.kubectl("delete", "pod", "dra-health", "-n", "default", "--wait=true")
    c.kubectl("delete", "resourceclaimtemplate", "scratch-template", "-n", "default")


def test_dra_restart_keeps_devices_and_prepares_no_claim_twice(dra, draclient):
    """6. The plugin's pod deleted and made again by the DaemonSet: running pods keep running
    with their devices, the new plugin prepares none of their claims again (the checkpoint),
    and a new pod gets a device from it. The kubelet's own client repeats a prepare the kubelet
    made before the restart, in both API versions: the same devices again, nothing prepared
    anew; a claim named with another UID (deleted and made again) gets its own error in the same
    batch."""
    c = dra.c
    running = {p: c.get_json("pod", "-n", "default", p)["metadata"]["uid"] for p in ("dra-kvm", "dra-third")}
    before = plugin_log(dra)
    [old] = dra.plugin_pods()
    c.kubectl("delete", "pod", "-n", NS, old["metadata"]["name"], "--wait=true", timeout=120)
    dra.rollout()
    [new] = dra.plugin_pods()
    assert new["metadata"]["uid"] != old["metadata"]["uid"]
    for name, uid in running.items():
        [p] = pods(c, f"kdp-e2e={name}")
        assert p.running and p.uid == uid and p.container.restarts == 0, f"{name} after the restart: {p}"
        assert seen(c, name) == expected("kvm"), f"{name} sees {seen(c, name)} after the restart"
    c.kubectl("delete", "pod", "dra-third", "-n", "default", "--wait=true")
    c.kubectl("apply", "-f", "-", stdin=json.dumps(probe_pod("dra-after", {"kvm": 1})))
    wait_running(c, "dra-after", timeout=180)
    after = plugin_log(dra)
    twice = [u for u in set(prepared_uids(before + after))
             if (prepared_uids(before) + prepared_uids(after)).count(u) > 1]
    assert not twice, f"claims prepared twice: {twice}\n{after[-3000:]}"
    assert len(prepared_uids(after)) == 1, f"the new plugin prepared {prepared_uids(after)}"
    checkpoint = c.node.kubelet_dir / "plugins/kubelet-device-plugins/dra-checkpoint.json"
    claims = json.loads(checkpoint.read_text())["claims"]
    kvm_claim = claim_of(c, c.get_json("pod", "-n", "default", "dra-kvm"))
    assert kvm_claim["metadata"]["uid"] in claims, f"the checkpoint lost dra-kvm's claim: {claims}"

    meta = kvm_claim["metadata"]
    [allocated] = kvm_claim["status"]["allocation"]["devices"]["results"]
    impostor = dict(meta, uid="00000000-0000-0000-0000-000000000000")
    for version in ("v1", "v1beta1"):
        answer = call_driver(dra, draclient, version, "prepare", meta, impostor)
        assert set(answer) == {meta["uid"], impostor["uid"]}, f"{version}: not every claim answered: {answer}"
        [device] = answer[meta["uid"]]["devices"]
        assert device["device_name"] == allocated["device"] and device["pool_name"] == NODE_NAME, answer
        assert device["cdi_device_ids"] == [f"{DOMAIN}/kvm=kvm"], answer
        assert device["request_names"] == [allocated["request"]], answer
        assert "deleted and made again" in answer[impostor["uid"]].get("error", ""), answer
    log = plugin_log(dra)
    assert meta["uid"] not in prepared_uids(log), f"the repeated prepare prepared the claim again:\n{log[-2000:]}"
    assert f"({meta['uid']}) is already prepared" in log


def test_dra_deleted_slices_are_published_again_at_once(dra):
    """6b. Our slices deleted behind our back (by an admin here; the kubelet does the same as it
    starts, in the background and possibly after it has registered us again): the plugin, which
    watches them, publishes them again within seconds, not at its next periodic check."""
    c = dra.c
    want = len(devices(c))
    before = {s["metadata"]["uid"] for s in slices(c)}
    assert before, "no slices to delete"
    c.kubectl("delete", "resourceslices", "--field-selector", SELECTOR, "--wait=true")
    start = time.monotonic()

    def back():
        now = slices(c)
        return now and not before & {s["metadata"]["uid"] for s in now} and len(devices(c)) == want
    try:
        wait_for(back, 30, "our ResourceSlices published again after their deletion")
    except AssertionError as e:
        raise AssertionError(f"{e}: {json.dumps(slices(c))[:2000]}\n{plugin_log(dra)[-3000:]}") from None
    took = time.monotonic() - start
    # Back because the watch saw it, not because a failing watch has the slices checked each try.
    log = plugin_log(dra)
    assert "cannot watch our ResourceSlices" not in log, log[-3000:]
    dra.measure(f"DRA: our ResourceSlices deleted to published again: {took:.2f} s")


def test_dra_kubelet_restart_publishes_slices_again(dra):
    """7. The kubelet restarted: it deletes every ResourceSlice of its node as it starts, and the
    plugin, registered again by the plugin watcher, publishes ours again; a running pod keeps its
    device and a new pod gets one."""
    c = dra.c
    before = {s["metadata"]["uid"] for s in slices(c)}
    c.node.stop_kubelet()
    start = time.monotonic()
    c.node.start_kubelet()

    def republished():
        now = slices(c)
        return now and not before & {s["metadata"]["uid"] for s in now} and len(devices(c)) == 8
    wait_for(republished, 90, "our ResourceSlices deleted by the kubelet and published again")
    took = time.monotonic() - start
    wait_for(c.node_ready, 90, "the Node Ready again")
    [p] = pods(c, "kdp-e2e=dra-kvm")
    assert p.running and p.container.restarts == 0, f"dra-kvm after the kubelet restart: {p}"
    c.kubectl("delete", "pod", "dra-after", "-n", "default", "--wait=true")
    c.kubectl("apply", "-f", "-", stdin=json.dumps(probe_pod("dra-late", {"kvm": 1})))
    wait_running(c, "dra-late", timeout=180)
    assert seen(c, "dra-late") == expected("kvm")
    dra.measure(f"DRA: kubelet restarted to our ResourceSlices published again: {took:.1f} s")


def test_dra_surge_update_serves_claims_throughout(dra):
    """6b. A DaemonSet update with the manifests' surge strategy while pods with claims keep
    coming, one at a time, each run and then deleted (its claim unprepared) before the next: the
    new plugin pod registers beside the old one (kubelets from 1.33 keep both and call the
    newer), both prepare from the one checkpoint in turns, and the new one takes the slices over
    when the old one exits. Two registration sockets of ours are seen at once and never none
(without this, there were moments with none and never two); every pod runs, no
    prepare or unprepare fails, no claim is prepared twice, our pool is never empty and is not
    written again (the same devices from either pod)."""
    c = dra.c
    delete_device_pods(c)
    # A surge replaces a pod that serves. One the API shows unready is deleted by the DaemonSet
    # controller at once, new pod or not: seen on 1.37 after the kubelet restart of the test
    # before, while the old pod's readiness probe had yet to run again (the kubelet then sent a
    # prepare to the deleted pod's socket).
    wait_for(lambda: all(Pod.from_json(p).ready for p in dra.plugin_pods()) or None,
             60, "our plugin pod Ready before the update")
    [old] = dra.plugin_pods()
    old_log = c.spawn_kubectl("logs", "-f", "-n", NS, old["metadata"]["name"])
    generation = max(s["spec"]["pool"]["generation"] for s in slices(c))
    registry = c.node.kubelet_dir / "plugins_registry"
    registered: list[tuple[float, int]] = []
    stop = threading.Event()

    def sample():
        # The sockets the plugin watcher registers, every 20 ms: how many of ours, and when.
        while not stop.is_set():
            registered.append((time.monotonic(), len(list(registry.glob(f"kdp-dra-{DOMAIN}*.sock")))))
            stop.wait(0.02)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    dra.env["KDP_E2E_GENERATION"] = "surge"
    dra.write(DRA_CONFIG)
    dra.apply()
    rollout = c.spawn_kubectl("-n", NS, "rollout", "status", DS, "--timeout=180s")
    start = time.monotonic()
    done_at = None
    took: list[float] = []
    claims: list[str] = []
    try:
        while done_at is None or time.monotonic() - done_at < 5:
            if done_at is None and rollout.poll() is not None:
                assert rollout.returncode == 0, f"rollout status failed: {rollout.communicate()}"
                done_at = time.monotonic()
            assert time.monotonic() - start < 240, "the rollout did not finish within 240 s"
            assert devices(c), "our pool was empty during the update"
            name = f"dra-surge-{len(took) + 1}"
            created = time.monotonic()
            c.kubectl("apply", "-f", "-", stdin=json.dumps(probe_pod(name, {"kvm": 1})))
            pod = wait_running(c, name, timeout=60)
            took.append(time.monotonic() - created)
            claims.append(claim_of(c, pod)["metadata"]["uid"])
            c.kubectl("delete", "pod", name, "-n", "default", "--wait=true", timeout=120)
    finally:
        rollout.kill()
        stop.set()
        sampler.join()
    wait_for(lambda: len(dra.plugin_pods()) == 1 or None, 60, "the old plugin pod gone")
    [new] = dra.plugin_pods()
    assert new["metadata"]["uid"] != old["metadata"]["uid"], "the update did not replace our pod"
    events = c.get_json("events", "-n", "default")["items"]
    failed = [f"{e['involvedObject']['name']}: {e['reason']}: {e.get('message', '')}" for e in events
              if e["involvedObject"]["name"].startswith("dra-surge-")
              and e["reason"] in ("FailedPrepareDynamicResources", "FailedUnprepareDynamicResources")]
    assert not failed, f"claims failed during the update: {failed}"
    counts = sorted({n for _, n in registered})
    assert 0 not in counts, f"a moment with no registration socket of ours: {counts}"
    both = [t for t, n in registered if n == 2]
    assert both, f"the two plugin pods were never registered at once: {counts}"
    assert max(counts) == 2, counts
    old_text = old_log.communicate(timeout=60)[0]
    by_old, by_new = prepared_uids(old_text), prepared_uids(plugin_log(dra))
    uids = by_old + by_new
    twice = sorted({u for u in uids if uids.count(u) > 1})
    assert not twice, f"claims prepared twice: {twice}"
    assert set(claims) <= set(uids), f"claims not prepared by either pod: {set(claims) - set(uids)}"
    after = max(s["spec"]["pool"]["generation"] for s in slices(c))
    assert after == generation, f"the pool was written again: generation {generation} -> {after}"
    took.sort()
    dra.measure(f"DRA surge update: {len(took)} pods with claims created one at a time through it, all "
                f"ran (creation to Running: median {took[len(took) // 2]:.2f} s, max {took[-1]:.2f} s); "
                f"their claims prepared {len(set(claims) & set(by_old))} by the old pod and "
                f"{len(set(claims) & set(by_new))} by the new; both registered for "
                f"{both[-1] - both[0]:.2f} s; pool generation {generation} before and after")


def failed_prepares(c, pod: str) -> int:
    """How many times the kubelet could not prepare the pod's claims, by its events."""
    events = c.get_json("events", "-n", "default", "--field-selector", f"involvedObject.name={pod}")
    return sum(e.get("count") or 1 for e in events["items"] if e["reason"] == "FailedPrepareDynamicResources")


# Power cuts in a row; the docs' figures are from 20 (KDP_E2E_DRA_REBOOTS=20), CI runs one.
REBOOTS = int(os.environ.get("KDP_E2E_DRA_REBOOTS", "1"))


def test_dra_node_reboot_bound_pod_waits_for_the_driver(dra):
    """6c. A power cut with a pod bound to the node whose kvm came through a claim, then
    containerd and the kubelet started again as on a real node, our driver coming back as the
    DaemonSet's pod: in classic mode that pod is refused for good when the kubelet admits it
    before the plugin registers (docs/src/reboot.md); here it must come back running, however
    the race goes, each of REBOOTS times. Measured: how long after the kubelet started, and how
    often the kubelet first found the driver missing."""
    c = dra.c
    delete_device_pods(c)
    name = "dra-reboot"
    c.kubectl("apply", "-f", "-", stdin=json.dumps(probe_pod(name, {"kvm": 1})))
    wait_running(c, name)
    control_plane = {p.pid for p in c.processes}
    took: list[float] = []
    missed = 0
    failures = failed_prepares(c, name)
    for i in range(REBOOTS):
        before = c.get_json("pod", "-n", "default", name)
        container = before["status"]["containerStatuses"][0]["containerID"]
        c.node.power_cut(keep=control_plane)
        c.node.start_containerd()
        started = time.monotonic()
        c.node.start_kubelet()

        def back():
            obj = c.get_json("pod", "-n", "default", name)
            if obj["status"].get("phase") == "Failed":
                raise AssertionError(f"after power cut {i + 1}, {name} failed: {json.dumps(obj['status'])[:1500]}")
            [status] = obj["status"].get("containerStatuses") or [{}]
            return (status.get("containerID") != container and "running" in status.get("state", {})) or None
        wait_for(back, 180, f"{name} running again after power cut {i + 1}")
        took.append(time.monotonic() - started)
        now = failed_prepares(c, name)
        missed += now > failures
        failures = now
        dra.rollout()
        wait_for(c.node_ready, 90, "the Node Ready again")
    assert seen(c, name) == expected("kvm"), f"{name} sees {seen(c, name)} after the power cuts"
    took.sort()
    dra.measure(f"DRA node reboot x{REBOOTS}, driver as the DaemonSet's pod: the bound kvm pod ran again "
                f"every time, {took[0]:.1f} / {took[len(took) // 2]:.1f} / {took[-1]:.1f} s (min / median / "
                f"max) after the kubelet started; the kubelet found the driver missing first in "
                f"{missed} of {REBOOTS}")


def test_dra_shared_device_gives_one_device_to_several_claims(dra):
    """7b. kvm with `allow_multiple_allocations` (count 2): published once, as `kvm` with
    allowMultipleAllocations and 2 slots of capacity. Two pods asking for kvm: 1 both run on it,
    each claim with a share of its own; a third waits for a share. A pod asking for kvm: 2 in
    one container stays Pending even with every share free: the scheduler meets one request's
    count with distinct devices. A pod whose two containers each ask for kvm: 1 runs, both
    requests on the one device."""
    c = dra.c
    delete_device_pods(c)
    shared = json.loads(json.dumps(DRA_CONFIG))
    assert shared["resources"][0]["name"] == "kvm" and shared["resources"][0]["count"] == 2
    shared["resources"][0]["allow_multiple_allocations"] = True
    dra.write(shared)
    dra.apply()
    try:
        wait_for(lambda: "kvm" in devices(c) and "kvm-0" not in devices(c), 180, "kvm published once, shared")
        kvm = devices(c)["kvm"]
        assert kvm.get("allowMultipleAllocations") is True, kvm
        assert kvm["capacity"]["slots"]["value"] == "2", kvm
        for name in ("shared-a", "shared-b"):
            c.kubectl("apply", "-f", "-", stdin=json.dumps(probe_pod(name, {"kvm": 1})))
        shares = []
        for name in ("shared-a", "shared-b"):
            pod = wait_running(c, name)
            assert seen(c, name) == expected("kvm"), f"{name} sees {seen(c, name)}"
            [result] = claim_of(c, pod)["status"]["allocation"]["devices"]["results"]
            assert result["device"] == "kvm" and result.get("shareID"), result
            shares.append(result["shareID"])
        assert shares[0] != shares[1], shares
        c.kubectl("apply", "-f", "-", stdin=json.dumps(probe_pod("shared-c", {"kvm": 1})))
        full = wait_unschedulable(c, "shared-c")
        c.kubectl("apply", "-f", "-", stdin=json.dumps(probe_pod("shared-two", {"kvm": 2})))
        wait_unschedulable(c, "shared-two")
        c.kubectl("delete", "pod", "shared-a", "shared-b", "shared-c", "-n", "default", "--wait=true")
        # Every share is free again: a new kvm: 1 pod runs, and kvm: 2 still does not.
        c.kubectl("apply", "-f", "-", stdin=json.dumps(probe_pod("shared-d", {"kvm": 1})))
        wait_running(c, "shared-d")
        two = wait_unschedulable(c, "shared-two")
        c.kubectl("delete", "pod", "shared-d", "shared-two", "-n", "default", "--wait=true")
        pair = probe_pod("shared-pair", {"kvm": 1})
        second = json.loads(json.dumps(pair["spec"]["containers"][0]))
        second["name"] = "probe-2"
        pair["spec"]["containers"].append(second)
        c.kubectl("apply", "-f", "-", stdin=json.dumps(pair))
        pod = wait_running(c, "shared-pair")
        results = claim_of(c, pod)["status"]["allocation"]["devices"]["results"]
        assert [r["device"] for r in results] == ["kvm", "kvm"], results
        assert len({r["shareID"] for r in results}) == 2, results
        dra.measure(f"DRA shared kvm (2 slots): two kvm: 1 pods ran on one device with shares "
                    f"{shares[0][:8]}.., {shares[1][:8]}..; a third Pending ({full[:80]!r}); kvm: 2 "
                    f"Pending with every share free ({two[:80]!r}); two containers of kvm: 1 ran")
    finally:
        delete_device_pods(c)
        dra.write(DRA_CONFIG)
        dra.apply()
        wait_for(lambda: "kvm-0" in devices(c) and "kvm" not in devices(c), 180, "kvm per slot again")


def test_dra_switch_to_device_plugin_and_back(dra):
    """8. The README's switch: device pods drained, `kubectl delete -k` of the DRA overlay (our
    slices go: the kubelet deletes them once the driver is gone; our sockets and CDI specs go),
    the device plugin applied (the node's allocatable offers kvm, a kvm pod runs through it),
    then back to DRA (allocatable at 0, slices back, a kvm pod runs through a claim)."""
    c = dra.c
    delete_device_pods(c)
    # Drained: the kubelet has released every claim (the plugin's checkpoint is empty), so
    # nothing of ours needs to outlive the plugin.
    checkpoint = c.node.kubelet_dir / "plugins/kubelet-device-plugins/dra-checkpoint.json"
    wait_for(lambda: not json.loads(checkpoint.read_text())["claims"], 60, "every claim unprepared")
    start = time.monotonic()
    c.kubectl("delete", "-k", str(dra.dir), "--wait=true", timeout=180)
    dra.applied = False
    wait_for(lambda: not c.get_json("pods", "-n", NS)["items"] if c.kubectl(
        "get", "ns", NS, check=False).returncode == 0 else True, 120, "our pods gone")
    wait_for(lambda: not slices(c), 90, "our ResourceSlices gone")
    gone = time.monotonic() - start
    node = c.node
    left = [str(p) for d in (node.kubelet_dir / "plugins_registry", node.kubelet_dir / "plugins", node.cdi_dir)
            if d.exists() for p in d.rglob("*") if "kdp" in p.name or p.name.endswith(".lock")
            or p.name.startswith("dra-checkpoint")]
    assert not left, f"left on the host after delete -k: {left}"
    dra.measure(f"DRA: delete -k to our ResourceSlices gone (the kubelet's wipe): {gone:.1f} s")

    classic = Install(c, dra.measures)
    classic.apply()
    classic.rollout()
    try:
        classic.expect_allocatable({"kvm": 2, "tun": 3, "fuse": 2})
        c.kubectl("apply", "-f", "-", stdin=json.dumps(probe_pod("classic-kvm", {"kvm": 1})))
        pod = wait_running(c, "classic-kvm")
        assert not pod["status"].get("extendedResourceClaimStatus"), "a device plugin pod got a DRA claim"
        assert seen(c, "classic-kvm") == expected("kvm")
    finally:
        delete_device_pods(c)
        c.kubectl("delete", "-k", str(classic.dir), "--wait=true", timeout=180)
        wait_for(lambda: not classic.allocatable(), 90, "allocatable 0 for our resources")

    dra.apply()
    dra.rollout()
    wait_for(lambda: len(devices(c)) == 8, 60, "our ResourceSlices back")
    c.kubectl("apply", "-f", "-", stdin=json.dumps(probe_pod("dra-again", {"kvm": 1})))
    pod = wait_running(c, "dra-again")
    assert claim_of(c, pod)["status"]["allocation"]["devices"]["results"][0]["driver"] == DOMAIN
    assert seen(c, "dra-again") == expected("kvm")


def pool_generation(c) -> int:
    return max((s["spec"]["pool"]["generation"] for s in slices(c)), default=0)


def test_dra_api_server_that_drops_taints_gets_few_writes(dra):
    """9. The control plane restarted with DRADeviceTaints and DRADeviceTaintRules off, as an
    operator may run it (all three components: the scheduler must agree with the API server):
    the API server drops the taint we write on a device whose node went. Before the fix every
    write came back as our own watch event and was made again (the pool's generation went from
    197 to 7,619 in 30 s). Now the plugin sees the taint dropped and leaves the device out of its
    slices, so no new claim can get it, and its writes stay few; back, the device is listed
    again. The gates are restored at the end."""
    c = dra.c
    c.restart_control_plane("DRADeviceTaints=false,DRADeviceTaintRules=false")
    try:
        [name] = wait_for(lambda: [n for n, d in devices(c).items() if resource_of(d) == "scratch"] or None,
                          60, "our slices listed after the API server restarted")
        unlinked = pool_generation(c)
        os.unlink(SCRATCH)
        try:
            start = time.monotonic()
            try:
                wait_for(lambda: devices(c) and name not in devices(c), 60, f"{name} left out of our slices")
            except AssertionError as e:
                raise AssertionError(f"{e}; meanwhile the pool's generation went from {unlinked} to "
                                     f"{pool_generation(c)}") from None
            took = time.monotonic() - start
            before = pool_generation(c)
            time.sleep(30)  # a window to count writes in: a loop would show hundreds a second
            writes = pool_generation(c) - before
            assert writes <= 2, f"the pool's generation went from {before} to {before + writes} in 30 s"
            log = plugin_log(dra)
            assert "without the taints of unhealthy devices" in log, log[-3000:]
        finally:
            make_scratch()
        wait_for(lambda: name in devices(c) and not devices(c)[name].get("taints"), 60, f"{name} listed again")
        dra.measure(f"DRA with DRADeviceTaints off: removed device out of our slices after {took:.1f} s; "
                    f"the pool's generation then went from {before} to {before + writes} in 30 s; "
                    f"{name} listed again when its node came back")
    finally:
        c.restart_control_plane()
        wait_for(lambda: devices(c), 60, "our slices listed after the API server restarted again")
