"""The real workloads pods run in the scenarios (integration/workloads): a KVM guest, a packet
through a TUN interface, a FUSE filesystem mounted and read. Here they are built (static C, with
the machine's compiler) for the test image, their pods are made from the docs' own example pods
(README.md and docs/src/using-devices.md, read through docs/blocks.py), and the one line each
prints is read back."""

from __future__ import annotations

import dataclasses
import os
import shlex
import subprocess
from pathlib import Path

import sys

import yaml

from .pods import DOMAIN

HERE = Path(__file__).resolve().parent.parent
SOURCES = HERE / "workloads"
sys.path.insert(0, str(HERE.parent / "docs"))
import blocks  # noqa: E402  (docs/blocks.py: the docs' code blocks, by check)

# Each workload: the program, the resource it needs, the device node it opens, and the name of
# the docs' example pod whose resources and securityContext its pod takes.
WORKLOADS = {
    "kvm": ("kvm-guest", "/dev/kvm", "vm"),
    "tun": ("tun-echo", "/dev/net/tun", "vpn"),
    "fuse": ("fuse-hello", "/dev/fuse", "fuse-mount"),
}


class BuildError(Exception):
    """A workload program did not compile."""


def build(out: Path) -> dict[str, Path]:
    """Every program, statically linked (the test image has no libc), into `out`: name -> path."""
    out.mkdir(parents=True, exist_ok=True)
    built = {}
    for program, _, _ in WORKLOADS.values():
        binary = out / program
        args = [os.environ.get("CC", "cc"), "-static", "-O2", "-Wall", "-Wextra", "-Werror",
                "-o", str(binary), str(SOURCES / f"{program}.c")]
        r = subprocess.run(args, capture_output=True, text=True)
        if r.returncode != 0:
            raise BuildError(f"{' '.join(args)}: {r.stderr.strip()}")
        built[program] = binary
    return built


@dataclasses.dataclass(frozen=True)
class Outcome:
    """A workload's one line: "<program> ok|fail key=value ..."."""

    program: str
    ok: bool
    facts: dict[str, str]
    line: str

    @classmethod
    def parse(cls, line: str) -> "Outcome":
        words = shlex.split(line)
        if len(words) < 2 or words[1] not in ("ok", "fail"):
            raise ValueError(f"not a workload's line: {line!r}")
        facts = dict(w.split("=", 1) for w in words[2:] if "=" in w)
        return cls(words[0], words[1] == "ok", facts, line)

    def __str__(self) -> str:
        return self.line


def finished_outcome(name: str, phase: str, output: str, program: str) -> Outcome:
    """The program's line in the output of a pod that ended in `phase`: it must have printed one,
    and said ok exactly when the pod succeeded."""
    got = next((Outcome.parse(l) for l in output.splitlines() if l.startswith(program + " ")), None)
    assert got, f"{name} ({phase}) printed no {program} line: {output[-1000:]!r}"
    assert phase == ("Succeeded" if got.ok else "Failed"), f"{name} is {phase}, but {program} said: {got}"
    return got


def example_pod(name: str) -> dict:
    """The docs' example Pod called `name` (a block the docs check as a manifest)."""
    for b in blocks.checked("manifest"):
        for doc in yaml.safe_load_all(b.text):
            if isinstance(doc, dict) and doc.get("kind") == "Pod" and doc["metadata"]["name"] == name:
                return doc
    raise AssertionError(f"the docs have no example Pod named {name!r}")


def example_security_context() -> dict:
    """The docs' securityContext that keeps a NET_ADMIN container from making a tun node."""
    for b in blocks.checked("container-fragment"):
        doc = yaml.safe_load(b.text)
        if list(doc) == ["securityContext"]:
            return doc["securityContext"]
    raise AssertionError("the docs show no securityContext block")


def host_numbers(path: str) -> str:
    rdev = os.stat(path).st_rdev
    return f"{os.major(rdev)}:{os.minor(rdev)}"


def workload_pod(resource: str, name: str, image: str, *, granted: bool, mknod: str = "") -> dict:
    """The docs' example pod for `resource`, running our workload program in the test image.
    granted=False leaves the device request out (every other line of the example stays). With
    `mknod` the program first makes the node itself, with the host's numbers, before it opens it;
    "add" adds CAP_MKNOD for that, "drop" puts the docs' securityContext that drops it."""
    program, path, example = WORKLOADS[resource]
    pod = example_pod(example)
    [c] = pod["spec"]["containers"]
    limits = (c.get("resources") or {}).get("limits") or {}
    want = f"{DOMAIN}/{resource}"
    assert limits.get(want) == 1, f"the docs' {example} pod does not ask for {want}: {limits}"
    if not granted:
        del limits[want]
        if not limits:
            del c["resources"]
    command = [f"/bin/{program}"]
    if mknod == "drop":
        c["securityContext"] = example_security_context()
    elif mknod == "add":
        c.setdefault("securityContext", {}).setdefault("capabilities", {}).setdefault("add", []).append("MKNOD")
    if mknod:
        command += ["--mknod", path]
        c["env"] = [{"name": "KDP_HOST_NUMBERS", "value": host_numbers(path)}]
    c.update({"image": image, "imagePullPolicy": "Never", "command": command})
    pod["metadata"] = {"name": name, "namespace": "default"}
    pod["spec"].update({"restartPolicy": "Never", "terminationGracePeriodSeconds": 1,
                        "automountServiceAccountToken": False})
    return pod


def device_cgroup() -> str:
    """The node's device cgroup and the runc that fills it, for the notes: who answers a device
    open with EPERM, and whose built-in rules apply."""
    version = ("cgroup v2 (a BPF program runc attaches)" if Path("/sys/fs/cgroup/cgroup.controllers").exists()
               else "cgroup v1 (the devices controller's list, per container)")
    r = subprocess.run(["runc", "--version"], capture_output=True, text=True)
    runc = r.stdout.splitlines()[0] if r.returncode == 0 and r.stdout else "runc: unknown version"
    return f"{version}, filled by {runc}"
