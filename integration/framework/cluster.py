"""A one-node cluster from real components, in the node's namespace: etcd, kube-apiserver,
kube-controller-manager and kube-scheduler of the kubelet's release, and the node's kubelet
registering its Node with them. Scenarios drive it only with kubectl (`Cluster.kubectl`).

Everything listens inside the node's private network namespace, on NODE_IP, an address added to
its loopback interface: the kubelet refuses a loopback node IP, and the API server needs an
address to advertise. Pods that are not hostNetwork get addresses from the node's CNI bridge.

Certificates are made per run with openssl (one CA; the service account key pair; a client
certificate per component, named as the API server's Node and RBAC authorizers expect), so the
cluster runs with the authorization kubeadm sets up: Node,RBAC and NodeRestriction.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
from pathlib import Path

from .node import NODE_NAME, Node, Process, SetupError
from .wait import WaitTimeout, wait_for

NODE_IP = "10.99.0.1"
APISERVER_PORT = 6443
ETCD_CLIENT, ETCD_PEER = 2379, 2380
SERVICE_RANGE = "10.96.0.0/24"


@dataclasses.dataclass(frozen=True)
class Binaries:
    """The control plane's binaries, as e2e.sh found or built them."""

    apiserver: Path
    controller_manager: Path
    scheduler: Path
    etcd: Path

    @classmethod
    def from_dir(cls, control_plane: Path, etcd: Path) -> "Binaries":
        b = cls(control_plane / "kube-apiserver", control_plane / "kube-controller-manager",
                control_plane / "kube-scheduler", etcd)
        for f in dataclasses.astuple(b):
            if not Path(f).is_file():
                raise SetupError(f"no control-plane binary {f}")
        return b


class Pki:
    """The run's certificates and keys, in one directory."""

    def __init__(self, root: Path):
        self.dir = root
        self.dir.mkdir(parents=True, exist_ok=True)
        self.ca = self.dir / "ca.crt"
        self._openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                      "-nodes", "-keyout", str(self.dir / "ca.key"), "-out", str(self.ca),
                      "-days", "3", "-subj", "/CN=kdp-e2e-ca",
                      "-addext", "basicConstraints=critical,CA:TRUE",
                      "-addext", "keyUsage=critical,keyCertSign,cRLSign,digitalSignature")
        # The service accounts' token signing key pair.
        self.sa_key, self.sa_pub = self.dir / "sa.key", self.dir / "sa.pub"
        self._openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", str(self.sa_key))
        self._openssl("ec", "-in", str(self.sa_key), "-pubout", "-out", str(self.sa_pub))

    def _openssl(self, *args: str) -> None:
        r = subprocess.run(["openssl", *args], capture_output=True, text=True)
        if r.returncode != 0:
            raise SetupError(f"openssl {' '.join(args[:2])}: {r.stderr.strip()}")

    def issue(self, name: str, subject: str, *, server_names: list[str] | None = None) -> tuple[Path, Path]:
        """A certificate signed by the CA: a client one, or a server one for `server_names`
        (IP addresses and DNS names). Returns (certificate, key)."""
        key, csr, crt = (self.dir / f"{name}.{ext}" for ext in ("key", "csr", "crt"))
        self._openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                      "-nodes", "-keyout", str(key), "-out", str(csr), "-subj", subject)
        ext = self.dir / f"{name}.ext"
        lines = ["basicConstraints=critical,CA:FALSE", "keyUsage=critical,digitalSignature,keyEncipherment"]
        if server_names:
            sans = [("IP:" if n[0].isdigit() else "DNS:") + n for n in server_names]
            lines += ["extendedKeyUsage=serverAuth", "subjectAltName=" + ",".join(sans)]
        else:
            lines += ["extendedKeyUsage=clientAuth"]
        ext.write_text("\n".join(lines) + "\n")
        self._openssl("x509", "-req", "-in", str(csr), "-CA", str(self.ca), "-CAkey", str(self.dir / "ca.key"),
                      "-CAcreateserial", "-days", "3", "-out", str(crt), "-extfile", str(ext))
        return crt, key

    def kubeconfig(self, name: str, subject: str, server: str) -> Path:
        """A kubeconfig for a client certificate of `subject` (JSON is YAML)."""
        crt, key = self.issue(name, subject)
        path = self.dir / f"{name}.kubeconfig"
        path.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config",
            "clusters": [{"name": "kdp-e2e", "cluster": {"server": server, "certificate-authority": str(self.ca)}}],
            "users": [{"name": name, "user": {"client-certificate": str(crt), "client-key": str(key)}}],
            "contexts": [{"name": "kdp-e2e", "context": {"cluster": "kdp-e2e", "user": name}}],
            "current-context": "kdp-e2e",
        }, indent=2))
        return path


class Cluster:
    """The control plane around `node`. `up()` starts it before the node's kubelet (which then
    registers with it); `down()` stops it after the node's own teardown has stopped the kubelet."""

    def __init__(self, node: Node, binaries: Binaries, kubectl: str):
        self.node, self.binaries, self.kubectl_bin = node, binaries, kubectl
        self.server = f"https://{NODE_IP}:{APISERVER_PORT}"
        self.processes: list[Process] = []
        self.pki: Pki | None = None
        self.admin: Path | None = None
        self.extra_nodes: list[Node] = []

    # --- bring-up ------------------------------------------------------------------------------
    def up(self) -> None:
        """Node and control plane, in the order a real node's boot has them."""
        n = self.node
        n.build_images()
        n.start_namespace()
        r = n.run("ip", "addr", "add", f"{NODE_IP}/32", "dev", "lo", check=False)
        if r.returncode != 0:
            raise SetupError(f"ip addr add {NODE_IP} dev lo: {r.stderr.strip()}")
        n.setup_cgroups()
        self.pki = pki = Pki(n.root / "pki")
        self.admin = pki.kubeconfig("admin", "/O=system:masters/CN=kubernetes-admin", self.server)
        self.start_etcd()
        self.start_control_plane()
        n.start_containerd()
        n.import_images()
        kubelet = pki.kubeconfig("kubelet", f"/O=system:nodes/CN=system:node:{NODE_NAME}", self.server)
        n.cluster_kubelet = (kubelet, NODE_IP)
        n.write_kubelet_config()
        n.start_kubelet()
        try:
            wait_for(self.node_ready, 90, f"Node {NODE_NAME} to be Ready")
        except WaitTimeout as e:
            raise SetupError(f"{e}: {n.kubelet.tail()}") from e

    def add_node(self, name: str) -> Node:
        """A second node, as a real cluster's next machine: the first one's images, a mount
        namespace, containerd, kubelet and pod subnet of its own, in the first one's network
        (where the API server listens), registered with this control plane and Ready."""
        first, pki = self.node, self.pki
        assert pki is not None
        settings = dataclasses.replace(first.settings, port_base=first.settings.port_base + 100 * (len(self.extra_nodes) + 1))
        n = Node(settings, name=name, net_of=first, index=len(self.extra_nodes) + 1)
        self.extra_nodes.append(n)
        for f in (first.root / "images").iterdir():
            shutil.copy(f, n.root / "images" / f.name)
        if (first.root / "rendered.yaml").exists():
            shutil.copy(first.root / "rendered.yaml", n.root / "rendered.yaml")
        n.start_namespace()
        n.setup_cgroups()
        n.start_containerd()
        n.import_images()
        kubelet = pki.kubeconfig(f"kubelet-{name}", f"/O=system:nodes/CN=system:node:{name}", self.server)
        n.cluster_kubelet = (kubelet, NODE_IP)
        n.write_kubelet_config()
        n.start_kubelet()
        try:
            wait_for(lambda: self.node_ready(name), 90, f"Node {name} to be Ready")
        except WaitTimeout as e:
            raise SetupError(f"{e}: {n.kubelet.tail()}") from e
        return n

    def remove_node(self, n: Node) -> None:
        """The node stopped and its Node object deleted."""
        n.failed = n.failed or self.node.failed
        n.down()
        self.extra_nodes.remove(n)
        self.kubectl("delete", "node", n.name, "--ignore-not-found", "--wait=false", check=False)

    def start_control_plane(self, extra: list[str] | None = None) -> None:
        """The API server, controller manager and scheduler, each with `extra` arguments."""
        pki = self.pki
        assert pki is not None
        extra = extra or []
        self.start_apiserver(extra)
        cm = pki.kubeconfig("controller-manager", "/CN=system:kube-controller-manager", self.server)
        self.spawn("kube-controller-manager", [
            str(self.binaries.controller_manager), f"--kubeconfig={cm}",
            f"--authentication-kubeconfig={cm}", f"--authorization-kubeconfig={cm}",
            "--bind-address=127.0.0.1", "--leader-elect=false",
            "--use-service-account-credentials=true",
            f"--service-account-private-key-file={pki.sa_key}", f"--root-ca-file={pki.ca}",
            # The default sync and grace periods are minutes: the node's kubelet is the only one.
            "--node-monitor-grace-period=60s", "--v=2", *extra,
        ])
        sched = pki.kubeconfig("scheduler", "/CN=system:kube-scheduler", self.server)
        self.spawn("kube-scheduler", [
            str(self.binaries.scheduler), f"--kubeconfig={sched}",
            f"--authentication-kubeconfig={sched}", f"--authorization-kubeconfig={sched}",
            "--bind-address=127.0.0.1", "--leader-elect=false", "--v=2", *extra,
        ])

    def restart_control_plane(self, feature_gates: str = "") -> None:
        """The API server, controller manager and scheduler stopped and started again, all three
        with `--feature-gates=<feature_gates>` (none: their defaults), as an operator changes a
        gate; etcd, the kubelet and the pods stay."""
        names = ("kube-apiserver", "kube-controller-manager", "kube-scheduler")
        for p in [p for p in reversed(self.processes) if p.name in names]:
            p.stop(10)
            self.processes.remove(p)
        self.start_control_plane([f"--feature-gates={feature_gates}"] if feature_gates else [])

    def spawn(self, name: str, args: list[str]) -> Process:
        p = self.node.spawn(name, args, self.node.logs / f"{name}.log")
        self.processes.append(p)
        return p

    def start_etcd(self) -> None:
        data = self.node.root / "etcd"
        p = self.spawn("etcd", [
            str(self.binaries.etcd), "--name=kdp-e2e", f"--data-dir={data}",
            f"--listen-client-urls=http://127.0.0.1:{ETCD_CLIENT}",
            f"--advertise-client-urls=http://127.0.0.1:{ETCD_CLIENT}",
            f"--listen-peer-urls=http://127.0.0.1:{ETCD_PEER}",
            f"--initial-advertise-peer-urls=http://127.0.0.1:{ETCD_PEER}",
            f"--initial-cluster=kdp-e2e=http://127.0.0.1:{ETCD_PEER}",
            "--listen-metrics-urls=", "--log-level=warn",
        ])

        def healthy() -> bool:
            if not p.alive():
                raise SetupError(f"etcd exited: {p.tail()}")
            return self.node.http_get(ETCD_CLIENT, "/health") is not None
        try:
            wait_for(healthy, 30, "etcd to be healthy")
        except WaitTimeout as e:
            raise SetupError(f"{e}: {p.tail()}") from e

    def start_apiserver(self, extra: list[str]) -> None:
        pki = self.pki
        assert pki is not None
        crt, key = pki.issue("apiserver", "/CN=kube-apiserver", server_names=[
            NODE_IP, "10.96.0.1", "127.0.0.1", "kubernetes", "kubernetes.default",
            "kubernetes.default.svc", "localhost"])
        kcrt, kkey = pki.issue("apiserver-kubelet-client", "/O=system:masters/CN=kube-apiserver-kubelet-client")
        p = self.spawn("kube-apiserver", [
            str(self.binaries.apiserver), f"--etcd-servers=http://127.0.0.1:{ETCD_CLIENT}",
            f"--advertise-address={NODE_IP}", "--bind-address=0.0.0.0", f"--secure-port={APISERVER_PORT}",
            f"--tls-cert-file={crt}", f"--tls-private-key-file={key}", f"--client-ca-file={pki.ca}",
            f"--service-account-key-file={pki.sa_pub}", f"--service-account-signing-key-file={pki.sa_key}",
            "--service-account-issuer=https://kubernetes.default.svc",
            f"--service-cluster-ip-range={SERVICE_RANGE}",
            "--authorization-mode=Node,RBAC", "--enable-admission-plugins=NodeRestriction",
            f"--kubelet-client-certificate={kcrt}", f"--kubelet-client-key={kkey}",
            "--kubelet-preferred-address-types=InternalIP", "--v=1", *extra,
        ])

        def serving() -> bool:
            if not p.alive():
                raise SetupError(f"kube-apiserver exited: {p.tail()}")
            r = self.kubectl("get", "--raw", "/readyz", check=False, timeout=10)
            return r.returncode == 0 and r.stdout.strip() == "ok"
        try:
            wait_for(serving, 90, "kube-apiserver /readyz")
        except WaitTimeout as e:
            raise SetupError(f"{e}: {p.tail()}") from e

    def down(self) -> None:
        """The kubelet and its pods, then the control plane (newest first), then the rest of the
        node; always, pass or fail."""
        for n in list(self.extra_nodes):
            n.failed = n.failed or self.node.failed
            n.down()
        self.node.stop_kubelet()
        self.node.kill_containers()
        for p in reversed(self.processes):
            p.stop(10)
        self.node.down()

    # --- kubectl -------------------------------------------------------------------------------
    def kubectl(self, *args: str, check: bool = True, timeout: float = 60,
                stdin: str | None = None, kubeconfig: Path | None = None) -> subprocess.CompletedProcess:
        """kubectl as the cluster's admin (or as whoever `kubeconfig` names), inside the node's
        network namespace."""
        assert self.admin is not None
        cmd = ["nsenter", "-t", str(self.node.holder.pid), "-n", "--",
               self.kubectl_bin, f"--kubeconfig={kubeconfig or self.admin}", *args]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, input=stdin)
        if check and r.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({r.returncode}): {r.stderr.strip()}")
        return r

    def token_kubeconfig(self, name: str, token: str) -> Path:
        """A kubeconfig that authenticates with `token` alone (no client certificate)."""
        assert self.pki is not None
        path = self.pki.dir / f"{name}.kubeconfig"
        path.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config",
            "clusters": [{"name": "kdp-e2e", "cluster": {"server": self.server,
                                                         "certificate-authority": str(self.pki.ca)}}],
            "users": [{"name": name, "user": {"token": token}}],
            "contexts": [{"name": "kdp-e2e", "context": {"cluster": "kdp-e2e", "user": name}}],
            "current-context": "kdp-e2e",
        }))
        return path

    def spawn_kubectl(self, *args: str) -> subprocess.Popen:
        """kubectl in the background (`rollout status` while a scenario acts)."""
        assert self.admin is not None
        return subprocess.Popen(["nsenter", "-t", str(self.node.holder.pid), "-n", "--",
                                 self.kubectl_bin, f"--kubeconfig={self.admin}", *args],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def get_json(self, *args: str) -> dict:
        return json.loads(self.kubectl("get", *args, "-o", "json").stdout)

    def node_object(self, name: str = NODE_NAME) -> dict | None:
        r = self.kubectl("get", "node", name, "-o", "json", check=False, timeout=10)
        return json.loads(r.stdout) if r.returncode == 0 else None

    def node_ready(self, name: str = NODE_NAME) -> bool:
        obj = self.node_object(name)
        if not obj:
            return False
        return any(c.get("type") == "Ready" and c.get("status") == "True"
                   for c in obj.get("status", {}).get("conditions") or [])

    def allocatable(self, domain: str) -> dict[str, int]:
        """The Node's allocatable of `domain`'s resources, by short name."""
        obj = self.node_object() or {}
        out = {}
        for name, value in (obj.get("status", {}).get("allocatable") or {}).items():
            if name.startswith(domain + "/"):
                out[name.split("/", 1)[1]] = int(value)
        return out
