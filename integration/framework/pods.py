"""Pods as the suite sees them: the probe pod's manifest, the kubelet's pod status as typed
objects, and the probe's reports of which device nodes its container sees."""

from __future__ import annotations

import dataclasses
from pathlib import Path

DOMAIN = "devices.anza-labs.dev"
# The device nodes the probe reports on, as containers see them.
PROBED = ["/dev/kvm", "/dev/net/tun", "/dev/fuse"]

# Each probe container prints, every 2 s, one line per device node and a "---" separator (and exits
# at once on TERM: as PID 1 it would otherwise ignore it):
#   /dev/kvm character special file a:e8 open=ok
#   /dev/net/tun absent
PROBE = """report() {
  for d in @PROBED@; do
    if [ -e "$d" ]; then
      o=denied; (exec 3<>"$d") 2>/dev/null && o=ok
      echo "$d $(stat -c "%F %t:%T" "$d") open=$o"
    else
      echo "$d absent"
    fi
  done
  echo ---
}
trap "exit 0" TERM
while true; do report; sleep 2 & wait $!; done
"""


@dataclasses.dataclass(frozen=True)
class Container:
    """The state of a pod's first container."""

    state: str  # running, terminated, waiting, none
    reason: str = ""
    exit_code: int | None = None
    restarts: int = 0
    # status.containerStatuses[].allocatedResourcesStatus (KEP-4680): resource -> {device ID: health}
    resources_health: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Pod:
    name: str
    uid: str
    phase: str
    reason: str
    message: str
    ready: bool | None
    container: Container

    @classmethod
    def from_json(cls, item: dict) -> "Pod":
        meta, status = item.get("metadata") or {}, item.get("status") or {}
        statuses = status.get("containerStatuses") or [{}]
        cs = statuses[0]
        state = cs.get("state") or {}
        kind = next((k for k in ("running", "terminated", "waiting") if k in state), "none")
        detail = state.get(kind) or {}
        health = {}
        for entry in cs.get("allocatedResourcesStatus") or []:
            health[entry.get("name", "")] = {
                r.get("resourceID", ""): r.get("health", "") for r in entry.get("resources") or []
            }
        ready = None
        for c in status.get("conditions") or []:
            if c.get("type") == "Ready":
                ready = c.get("status") == "True"
        return cls(
            name=meta.get("name", ""),
            uid=meta.get("uid", ""),
            phase=status.get("phase", ""),
            reason=status.get("reason", ""),
            message=(status.get("message") or "").replace("\n", " "),
            ready=ready,
            container=Container(kind, detail.get("reason", ""), detail.get("exitCode"),
                                cs.get("restartCount", 0), health),
        )

    @property
    def running(self) -> bool:
        return self.phase == "Running" and self.container.state == "running"

    @property
    def ended(self) -> bool:
        return self.phase in ("Failed", "Succeeded")

    @property
    def refused(self) -> bool:
        """Failed admission the way the kubelet refuses a pod its devices cannot serve."""
        return self.phase == "Failed" and self.reason == "UnexpectedAdmissionError"

    def __str__(self) -> str:
        c = self.container
        state = c.state + (f":{c.exit_code}:{c.reason}" if c.state == "terminated" else
                           f":{c.reason}" if c.state == "waiting" else "")
        text = f"{self.phase or '?'} container={state} restarts={c.restarts}"
        if self.reason or self.message:
            text += f" ({self.reason}: {self.message})"
        return text


def probe_pod(name: str, image: str, resources: list[str], unique: str, probed=PROBED,
              **spec_extra) -> dict:
    """A static pod whose container requests one of each resource (short names) and reports on
    the nodes at `probed`."""
    container = {
        "name": "probe",
        "image": image,
        "imagePullPolicy": "Never",
        "command": ["/bin/sh", "-c", PROBE.replace("@PROBED@", " ".join(probed))],
    }
    if resources:
        container["resources"] = {"limits": {f"{DOMAIN}/{r}": "1" for r in resources}}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": "default",
            # A static pod's UID is a hash of its manifest: a pod re-created from the same
            # manifest after being deleted gets the old UID, and the kubelet then reports the old
            # pod's final status instead of running it. This makes every manifest unique.
            "annotations": {"kdp-e2e/created": unique},
        },
        "spec": {
            "hostNetwork": True,
            "dnsPolicy": "Default",
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 1,
            "containers": [container],
            **spec_extra,
        },
    }


@dataclasses.dataclass(frozen=True)
class Seen:
    """One device node as the probe saw it."""

    path: str
    kind: str  # "character special file", "block special file", "absent"
    numbers: str = ""  # major:minor in hex, as stat prints them
    opens: bool = False


def cri_log_text(log: Path) -> str:
    """What a container printed, from its CRI log ("<time> <stream> <tag> <text>" lines)."""
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return ""
    bodies = []
    for line in text.splitlines():
        parts = line.split(" ", 3)
        if len(parts) == 4:
            bodies.append(parts[3])
    return "\n".join(bodies)


def read_reports(log: Path) -> list[dict[str, Seen]]:
    """Every complete report in a probe container's CRI log."""
    return reports_from_text(cri_log_text(log))


def reports_from_text(text: str) -> list[dict[str, Seen]]:
    """Every complete report in the probe's output (`kubectl logs`, or a CRI log's texts)."""
    reports, current = [], {}
    for body in text.splitlines():
        if body == "---":
            reports.append(current)
            current = {}
            continue
        path, _, rest = body.partition(" ")
        if rest == "absent":
            current[path] = Seen(path, "absent")
        elif " open=" in rest:
            desc, _, opened = rest.rpartition(" open=")
            kind, _, numbers = desc.rpartition(" ")
            current[path] = Seen(path, kind, numbers, opened == "ok")
    return reports
