#!/usr/bin/env python3
"""Turn the DaemonSet in rendered manifests (`kubectl kustomize manifests/`) into a static pod.

The pod is the DaemonSet's pod template as it stands: securityContext, volumes, probes, args, env,
image, priority and tolerations are copied, not rewritten. One thing a static pod cannot have is
dropped: its ServiceAccount (kubelet 1.37 refuses a static pod that names one; ours has no
token and no RBAC rules, so the pod runs the same without it). The end-to-end suite only adds what a
scenario needs, each one an addition an operator could make with an overlay:
  --env KEY=VALUE       appended to the plugin container's env (e.g. KDP_RESOURCES)
  --host-dir PATH       a read-only hostPath volume mounted at the same path (e.g. a --dev-root)
  --run-as UID          runAsUser/runAsGroup UID and runAsNonRoot (to show what UID 0 is for)
  --annotation K=V      on the pod (the suite makes each manifest unique with one)

Usage:
  pod_from_daemonset.py --image RENDERED.yaml      prints the plugin container's image
  pod_from_daemonset.py RENDERED.yaml --name NAME [options]   prints the pod as JSON
Needs PyYAML (Debian: python3-yaml).
"""

import argparse
import copy
import json
import sys

import yaml

CONTAINER = "kubelet-device-plugins"


def daemonset(path):
    with open(path) as f:
        found = [d for d in yaml.safe_load_all(f) if d and d.get("kind") == "DaemonSet"]
    if len(found) != 1:
        sys.exit(f"pod_from_daemonset.py: {path} has {len(found)} DaemonSets, expected 1")
    return found[0]


def plugin_container(spec):
    containers = spec.get("containers") or []
    named = [c for c in containers if c.get("name") == CONTAINER]
    if len(named) == 1:
        return named[0]
    if len(containers) == 1:
        return containers[0]
    sys.exit(f"pod_from_daemonset.py: no container named {CONTAINER} in the pod template")


def pair(spec, what):
    key, sep, value = spec.partition("=")
    if not sep or not key:
        sys.exit(f"pod_from_daemonset.py: {what} wants KEY=VALUE, got {spec!r}")
    return key, value


def make_pod(ds, args):
    template = ds["spec"]["template"]
    spec = copy.deepcopy(template["spec"])
    for key in ("serviceAccountName", "serviceAccount"):
        spec.pop(key, None)
    meta = template.get("metadata") or {}
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": args.name,
            "namespace": ds["metadata"].get("namespace", "default"),
            "labels": dict(meta.get("labels") or {}),
            "annotations": dict(meta.get("annotations") or {}),
        },
        "spec": spec,
    }
    pod["metadata"]["annotations"].update(pair(a, "--annotation") for a in args.annotation)
    container = plugin_container(spec)
    env = container.setdefault("env", [])
    for spec_ in args.env:
        key, value = pair(spec_, "--env")
        env[:] = [e for e in env if e.get("name") != key]
        env.append({"name": key, "value": value})
    for i, path in enumerate(args.host_dir):
        name = f"e2e-host-dir-{i}"
        spec.setdefault("volumes", []).append(
            {"name": name, "hostPath": {"path": path, "type": "Directory"}}
        )
        container.setdefault("volumeMounts", []).append(
            {"name": name, "mountPath": path, "readOnly": True}
        )
    if args.run_as is not None:
        sc = spec.setdefault("securityContext", {})
        sc.update(runAsUser=args.run_as, runAsGroup=args.run_as, runAsNonRoot=args.run_as != 0)
        # A container-level setting would override the pod's; the template sets none, keep it so.
        csc = container.get("securityContext") or {}
        for k in ("runAsUser", "runAsGroup", "runAsNonRoot"):
            csc.pop(k, None)
    return pod


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("rendered", help="output of kubectl kustomize")
    p.add_argument("--image", action="store_true", help="print the plugin container's image and stop")
    p.add_argument("--name")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--host-dir", action="append", default=[], metavar="PATH")
    p.add_argument("--run-as", type=int, metavar="UID")
    p.add_argument("--annotation", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    ds = daemonset(args.rendered)
    if args.image:
        print(plugin_container(ds["spec"]["template"]["spec"])["image"])
        return 0
    if not args.name:
        p.error("--name is required to make a pod")
    json.dump(make_pod(ds, args), sys.stdout, indent=2, sort_keys=True)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
