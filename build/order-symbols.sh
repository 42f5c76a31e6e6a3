#!/usr/bin/env bash
# Regenerates build/symbol-order.txt, the functions classic mode runs: build.rs hands the file to
# the linker (lld's --symbol-ordering-file) for x86_64 release builds, which then places those
# functions together at the front of .text. Without it the linker interleaves them with DRA
# mode's code (TLS, the HTTP client, the API types) and the kernel's fault-around maps 64 KiB
# around every page touched, so a classic-mode process ends up with most of the binary resident
# (BENCHMARKS.md, "Classic mode's footprint").
#
#   bash build/order-symbols.sh
#
# How: the integration tests of classic mode (start-up, registration in both ways, ListAndWatch,
# Allocate, health, restarts of the kubelet and of ours, a second instance, hostile clients,
# metrics, SIGTERM) run our binary under valgrind's callgrind, which names every function
# executed; the file lists them, the most executed first. Some tests fail under valgrind's
# slowness, which costs nothing here: what ran is what counts. Symbol names carry a hash of how
# each crate was built, so this is done for both release builds: the static one the image ships
# (build/static.sh) and the one `cargo build --release` and `cargo bench` make. Names the linker
# does not find are skipped, so a stale file costs only footprint: rerun this after changes
# that move much code around, and watch the CI guard's RSS ratio (BENCHMARKS.md).
#
# Needs valgrind (Debian: apt-get install valgrind) and about 10 minutes beyond the builds.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
command -v valgrind >/dev/null || { echo "order-symbols.sh: valgrind is needed" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

tests=$(cargo test --locked --no-run --test integration 2>&1 |
  sed -n 's/.*Executable tests\/integration\/main.rs (\(.*\))$/\1/p')
[[ -x $tests ]] || { echo "order-symbols.sh: no integration test binary" >&2; exit 1; }

trace() { # BINARY NAME: classic mode's integration tests with BINARY under callgrind
  printf '#!/bin/sh\nexec valgrind --tool=callgrind --demangle=no --dump-instr=no --callgrind-out-file=%s "%s" "$@"\n' \
    "$work/cg.$2.%p" "$1" >"$work/$2"
  chmod +x "$work/$2"
  echo "tracing $1" >&2
  KDP_TEST_BINARY=$work/$2 "$tests" --test-threads=1 \
    daemon streams instances metrics plugin_watcher hostile roots >&2 || true
}

bash build/static.sh amd64 >/dev/null
static=${CARGO_TARGET_DIR:-target}/x86_64-unknown-linux-gnu/release/kubelet-device-plugins
cargo build --release --locked --bin kubelet-device-plugins >&2
trace "$static" static
trace "${CARGO_TARGET_DIR:-target}/release/kubelet-device-plugins" release

# Every function named in any profile (as run, fn=, or as called, cfn=), by instructions
# executed in it across all profiles, the most first. Callgrind compresses a name to "(id)"
# after its first use in a file.
python3 - "$work" >build/symbol-order.txt <<'PY'
import collections, glob, re, sys

cost = collections.Counter()
for path in glob.glob(sys.argv[1] + "/cg.*"):
    names, current, skip = {}, None, False
    for line in open(path, errors="replace"):
        if skip:
            # The line after calls= is the call's inclusive cost, the callee's not ours.
            skip = False
            continue
        if line.startswith("calls="):
            skip = True
            continue
        m = re.match(r"(c?fn)=\((\d+)\)(?: (.*))?$", line.rstrip("\n"))
        if m:
            kind, ident, name = m.groups()
            if name:
                names[ident] = name
            name = names.get(ident)
            if kind == "fn":
                current = name
            cost[name] += 0
            continue
        # A cost line: "position instructions" under the current function.
        m = re.match(r"^[+-]?\d+ (\d+)$", line) or re.match(r"^\* (\d+)$", line)
        if m and current:
            cost[current] += int(m.group(1))
for name, _ in sorted(cost.items(), key=lambda kv: (-kv[1], kv[0])):
    # Addresses without a symbol, and valgrind's own names, are nothing the linker knows.
    if name and not name.startswith("0x") and " " not in name and "'" not in name:
        print(name)
PY
echo "build/symbol-order.txt: $(wc -l <build/symbol-order.txt) functions" >&2
