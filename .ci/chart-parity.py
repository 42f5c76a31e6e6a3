"""The Helm chart and the kustomize manifests render the same objects for the same settings.

    chart-parity.py HELM.yaml KUSTOMIZE.yaml

Objects are matched by kind and name. Labels are left out (Helm adds its own, and the instance
label to selectors), so is the namespace of cluster-scoped objects, and the ConfigMap's file is
compared as YAML, not as text (the kustomize one carries comments). Allowed differences, each for a reason: the Namespace, which only the
manifests make (Helm installs into the release's namespace), and DeviceClasses of the manifests
for resources the configuration does not list (their DRA overlay ships one per built-in; the
chart makes one per configured resource). Exits 1 with every difference listed.
"""
import sys

import yaml

# Kinds without a namespace. kustomize's namespace transformer sets one on the kinds it does not
# know (DeviceClass, the admission policies); the API server clears it on create.
CLUSTER_SCOPED = {"ClusterRole", "ClusterRoleBinding", "DeviceClass", "ValidatingAdmissionPolicy",
                  "ValidatingAdmissionPolicyBinding"}
HELM_ONLY_LABELS = {"app.kubernetes.io/instance", "app.kubernetes.io/managed-by",
                    "app.kubernetes.io/version", "helm.sh/chart"}


def objects(path):
    out = {}
    with open(path) as f:
        for doc in yaml.safe_load_all(f):
            if doc:
                out[(doc["kind"], doc["metadata"]["name"])] = doc
    return out


def normalise(obj):
    """What must match: the object without its labels or Helm's selector label."""
    obj = yaml.safe_load(yaml.safe_dump(obj))
    obj["metadata"].pop("labels", None)
    if obj["kind"] in CLUSTER_SCOPED:
        obj["metadata"].pop("namespace", None)
    if obj["kind"] == "ConfigMap":
        obj["data"] = {k: yaml.safe_load(v) for k, v in obj["data"].items()}

    def strip(node):
        if isinstance(node, dict):
            for key in ("matchLabels", "selector"):
                if isinstance(node.get(key), dict) and all(isinstance(v, str) for v in node[key].values()):
                    node[key] = {k: v for k, v in node[key].items() if k not in HELM_ONLY_LABELS}
            if "template" in node and isinstance(node["template"], dict):
                labels = node["template"].get("metadata", {}).get("labels")
                if labels:
                    node["template"]["metadata"]["labels"] = {
                        k: v for k, v in labels.items() if k not in HELM_ONLY_LABELS}
            for v in node.values():
                strip(v)
        elif isinstance(node, list):
            for v in node:
                strip(v)
    strip(obj)
    return obj


def diff(a, b, path=""):
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if k not in a:
                yield f"{path}.{k}: only in the manifests: {b[k]!r}"
            elif k not in b:
                yield f"{path}.{k}: only in the chart: {a[k]!r}"
            else:
                yield from diff(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            yield from diff(x, y, f"{path}[{i}]")
    elif a != b:
        yield f"{path}: chart {a!r}, manifests {b!r}"


def main(helm_path, kustomize_path):
    helm, kust = objects(helm_path), objects(kustomize_path)
    configured = set()
    for (kind, _), obj in helm.items():
        if kind == "ConfigMap":
            for data in obj["data"].values():
                configured |= {r["name"] for r in (yaml.safe_load(data) or {}).get("resources", [])}
    problems = []
    for key in sorted(set(helm) | set(kust)):
        kind, name = key
        if key not in helm:
            if kind == "Namespace":
                continue
            if kind == "DeviceClass" and name.split(".", 1)[0] not in configured:
                continue
            problems.append(f"{kind}/{name}: only the manifests make it")
        elif key not in kust:
            problems.append(f"{kind}/{name}: only the chart makes it")
        else:
            problems += [f"{kind}/{name}{d}" for d in diff(normalise(helm[key]), normalise(kust[key]))]
    for p in problems:
        print(p)
    print(f"compared {len(set(helm) & set(kust))} objects: {len(problems)} difference(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
