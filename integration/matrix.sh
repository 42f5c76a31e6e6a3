#!/usr/bin/env bash
# The compatibility matrix: the kubelet of every minor release from 1.21 to 1.36 (the patch
# pinned in integration/releases/1.N, built from Go modules and cached by version), each running
# the core node scenarios with the plugin as a process in both registration modes. Writes the
# table into docs/src/compatibility.md with the date and the commit it ran on. Not part of CI (about
# 3 minutes to build each kubelet cold, a little over 1 to run it); run by hand as root:
#
#   sudo bash integration/matrix.sh            every minor from 1.21 to 1.36
#   sudo bash integration/matrix.sh 24 25 36   those minors only (the table keeps the others' rows)
#   bash integration/matrix.sh --table         only writes the table from the last results
#
# Environment: PLUGIN_BIN (default target/debug/kubelet-device-plugins), KDP_E2E_CACHE and Go's
# caches as for e2e.sh. 1.20 and the newest release are proven by every CI run (.ci/run).
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(dirname "$HERE")
export KDP_E2E_CACHE=${KDP_E2E_CACHE:-/var/cache/kubelet-device-plugins/e2e}
PLUGIN_BIN=${PLUGIN_BIN:-$REPO/target/debug/kubelet-device-plugins}
OUT=$REPO/docs/src/compatibility.md
RESULTS=$KDP_E2E_CACHE/matrix
mkdir -p "$RESULTS"

say() { printf '%s [matrix] %s\n' "$(date +%T)" "$*" >&2; }

# The core scenarios, each a node-suite test run in kubelet-socket and plugin-watcher mode.
SCENARIOS=(
  "pods get exactly their devices:test_a_pod_requesting_a_device_sees_it_and_no_other or test_a_pod_requesting_nothing_sees_no_device_node"
  "kubelet restart:test_after_a_kubelet_restart_the_plugin_registers_again_and_pods_keep_and_get_devices"
  "plugin restart:test_after_a_plugin_restart_running_pods_keep_devices_and_new_pods_get_them"
  "device removed and restored:test_a_removed_device_node_is_refused_then_admitted_when_back"
  "second instance hands over:test_a_second_instance_takes_over_as_in_a_surge_rollout_and_device_pods_keep_coming"
)

minors=("$@")
if [[ ${minors[0]:-} == --table ]]; then
  minors=()
elif ((${#minors[@]} == 0)); then
  minors=($(seq 21 36))
fi

for minor in "${minors[@]+"${minors[@]}"}"; do
  [[ -f $HERE/releases/1.$minor/go.mod ]] || { say "1.$minor: no integration/releases/1.$minor (pin it with releases/pin.sh)"; exit 2; }
  kubelet=$(bash "$HERE/build-newest-kubelet.sh" --release "1.$minor" | tail -1)
  filter=""
  for s in "${SCENARIOS[@]}"; do filter+="${filter:+ or }${s#*:}"; done
  say "1.$minor: $kubelet"
  xml=$RESULTS/1.$minor.xml
  log=$RESULTS/1.$minor.log
  rm -f "$xml"
  KDP_E2E_REGISTRATION="kubelet-socket plugin-watcher" PLUGIN_BIN=$PLUGIN_BIN KUBELET=$kubelet \
    bash "$HERE/e2e.sh" -k "$filter" --junitxml="$xml" > "$log" 2>&1 || true
  tail -1 "$log" >&2
done

# The table, from every minor's last results (a minor not run this time keeps its row).
commit=$(git -C "$REPO" rev-parse --short HEAD)$(git -C "$REPO" diff --quiet HEAD -- src || echo "+changes")
python3 - "$RESULTS" "$OUT" "$commit" "${SCENARIOS[@]}" <<'EOF'
import re
import sys
import xml.etree.ElementTree as ET
from datetime import date
from pathlib import Path

results, out, commit, scenarios = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4:]
def outcomes(cases, test, mode):
    """The test's outcomes in one mode: a case may be parametrized further (name[mode-kvm])."""
    found = [outcome for name, outcome in cases.items()
             if name == f"{test}[{mode}]" or name.startswith(f"{test}[{mode}-")]
    return found or ["not run"]


header = ["minor", "kubelet", "containerd"] + [s.split(":", 1)[0] for s in scenarios] + \
         ["registered again after a kubelet restart"]
rows = []
for xml in sorted(results.glob("1.*.xml"), key=lambda p: int(p.stem.split(".")[1])):
    log = xml.with_suffix(".log").read_text(errors="replace")
    m = re.search(r"\[e2e\] kubelet \S+ \((?:Kubernetes )?(v[0-9.]+)\), containerd (.+?), plugin", log)
    kubelet, containerd = (m.group(1), m.group(2).replace("of Debian ", "Debian ")) if m else ("?", "?")
    containerd = re.sub(r".*containerd-(v[0-9.]+)-\w+$", r"\1", containerd)
    cases = {}
    for case in ET.parse(xml).getroot().iter("testcase"):
        failed = case.find("failure") is not None or case.find("error") is not None
        skipped = case.find("skipped") is not None
        cases[case.get("name")] = "fail" if failed else ("skip" if skipped else "pass")
    row = [xml.stem, kubelet, containerd]
    for s in scenarios:
        tests = s.split(":", 1)[1].split(" or ")
        modes = []
        for mode in ("kubelet-socket", "plugin-watcher"):
            got = [outcome for t in tests for outcome in outcomes(cases, t, mode)]
            modes.append("pass" if all(g == "pass" for g in got) else
                         next(g for g in got if g != "pass"))
        row.append(" / ".join(modes))
    again = re.findall(r"\[kubelet 1\.\d+, ([a-z-]+)\] kubelet restart, our endpoint registered: "
                       r"kvm .*?, (\d+ ms|never) after its device manager did", log)
    row.append(" / ".join(f"{ms}" for _, ms in again) or "-")
    rows.append(row)

table = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
table += ["| " + " | ".join(r) + " |" for r in rows]
text = out.read_text() if out.exists() else ""
begin, end = "<!-- matrix:begin -->", "<!-- matrix:end -->"
block = (f"{begin}\nRun on {date.today().isoformat()}, plugin at `{commit}`, by "
         f"`integration/matrix.sh`. Each scenario cell: kubelet-socket mode / plugin-watcher mode.\n\n"
         + "\n".join(table) + f"\n{end}")
if begin in text:
    text = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: block, text, flags=re.S)
else:
    text += ("\n" if text else "") + block + "\n"
out.write_text(text)
print(f"wrote {out}: {len(rows)} rows")
EOF
