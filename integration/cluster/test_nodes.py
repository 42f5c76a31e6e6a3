"""DRA mode on two nodes of one cluster: a second node (its own kubelet, containerd, mount
namespace and pod subnet, in the first one's network) joins the control plane, the DaemonSet
runs the driver on both, and each publishes its own pool. The admission policy keeps each
driver to its own node's slices, with the token the kubelet would mount in its pod; and the
scheduler allocates claims from both pools, each pod getting its node's device. Runs after
test_modes.py (file order), from 1.36 as the DRA scenarios do."""

from __future__ import annotations

import json

import pytest

from framework.cluster import APISERVER_PORT, NODE_IP
from framework.install import CONFIG, NS, Install, expected, pods, probe_pod, seen
from framework.node import NODE_NAME
from framework.pods import DOMAIN
from framework.wait import wait_for

SECOND = "kdp-e2e-2"
DRA_CONFIG = {"mode": "dra", "resources": CONFIG["resources"]}


@pytest.fixture(scope="module")
def two(cluster, measures):
    if cluster.node.settings.kubelet_minor < 36:
        pytest.skip(f"DRA mode is proven from Kubernetes 1.36; this cluster is 1.{cluster.node.settings.kubelet_minor}")
    second = cluster.add_node(SECOND)
    d = Install(cluster, measures, overlay="dra", config=DRA_CONFIG)
    d.env.update({"KUBERNETES_SERVICE_HOST": NODE_IP, "KUBERNETES_SERVICE_PORT": str(APISERVER_PORT)})
    d.write(DRA_CONFIG)
    try:
        d.apply()
        d.rollout()
        yield d
    finally:
        cluster.kubectl("delete", "pods", "-n", "default", "-l", "kdp-e2e", "--wait=true", "--ignore-not-found",
                        check=False, timeout=120)
        cluster.kubectl("delete", "-k", str(d.dir), "--wait=true", "--ignore-not-found", check=False, timeout=180)
        cluster.remove_node(second)


def plugin_pod_on(d: Install, node: str) -> dict:
    [pod] = [p for p in d.plugin_pods() if p["spec"].get("nodeName") == node]
    return pod


def pool(c, node: str) -> list[str]:
    items = c.get_json("resourceslices", "--field-selector", f"spec.nodeName={node},spec.driver={DOMAIN}")["items"]
    return sorted(d["name"] for s in items for d in s["spec"].get("devices") or [])


def test_each_node_publishes_its_own_pool(two):
    c = two.c
    for node in (NODE_NAME, SECOND):
        plugin_pod_on(two, node)
        wait_for(lambda: pool(c, node) or None, 60, f"{node}'s pool")
    assert pool(c, NODE_NAME) == pool(c, SECOND), "the two nodes serve the same configuration"
    two.measure(f"DRA on two nodes: each node's driver published its own pool of {len(pool(c, SECOND))} devices")


def test_each_driver_may_write_only_its_own_nodes_slices(two):
    """With the token the kubelet mounts in each plugin pod (bound to the pod, and so to its
    node), a slice of its own node is accepted and one of the other node is refused with the
    policy's message. Server-side dry runs: nothing is stored."""
    c = two.c
    for node, other in ((NODE_NAME, SECOND), (SECOND, NODE_NAME)):
        pod = plugin_pod_on(two, node)
        token = c.kubectl("create", "token", "kubelet-device-plugins", "-n", NS, "--duration=10m",
                          "--bound-object-kind=Pod", f"--bound-object-name={pod['metadata']['name']}",
                          f"--bound-object-uid={pod['metadata']['uid']}").stdout.strip()
        as_plugin = c.token_kubeconfig(f"dra-plugin-{node}", token)

        def create(target: str):
            slice_ = {"apiVersion": "resource.k8s.io/v1", "kind": "ResourceSlice",
                      "metadata": {"generateName": "kdp-e2e-policy-"},
                      "spec": {"driver": DOMAIN, "nodeName": target,
                               "pool": {"name": target, "generation": 1, "resourceSliceCount": 1},
                               "devices": []}}
            return c.kubectl("create", "--dry-run=server", "-f", "-", stdin=json.dumps(slice_), check=False,
                             kubeconfig=as_plugin)
        theirs = create(other)
        assert theirs.returncode != 0 and "may only write ResourceSlices of its own node" in theirs.stderr, \
            f"{node}'s driver writing {other}'s slice: {theirs.returncode} {theirs.stdout} {theirs.stderr}"
        own = create(node)
        assert own.returncode == 0, f"{node}'s driver writing its own slice: {own.stderr}"


def test_the_scheduler_places_claims_on_both_nodes(two):
    """A pod asking for kvm on each node (by nodeSelector): the scheduler allocates each claim
    from that node's pool, both pods run and see /dev/kvm through their node's driver."""
    c = two.c
    for node in (NODE_NAME, SECOND):
        pod = probe_pod(f"two-{node}", {"kvm": 1})
        pod["spec"]["nodeSelector"] = {"kubernetes.io/hostname": node}
        c.kubectl("apply", "-f", "-", stdin=json.dumps(pod))
    for node in (NODE_NAME, SECOND):
        name = f"two-{node}"
        wait_for(lambda: any(p.running for p in pods(c, f"kdp-e2e={name}")) or None, 120, f"{name} running")
        obj = c.get_json("pod", "-n", "default", name)
        assert obj["spec"]["nodeName"] == node
        claim_name = obj["status"]["extendedResourceClaimStatus"]["resourceClaimName"]
        claim = c.get_json("resourceclaim", "-n", "default", claim_name)
        [result] = claim["status"]["allocation"]["devices"]["results"]
        assert result["pool"] == node and result["driver"] == DOMAIN, result
        assert seen(c, name) == expected("kvm"), f"{name} sees {seen(c, name)}"
    two.measure("DRA on two nodes: a kvm pod on each ran with a claim allocated from its own node's pool")
