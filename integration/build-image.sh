#!/usr/bin/env bash
# Builds the plugin's runtime image without a Docker engine, as an OCI image tarball that
# `ctr images import`, `podman load` or `docker load` take:
#
#   bash integration/build-image.sh OUT.tar [IMAGE-NAME]
#   KDP_IMAGE_ARCH=arm64 bash integration/build-image.sh OUT.tar    another architecture's image
#
# The binary is built by the script the Dockerfile's build stage runs (build/static.sh: a static
# release build with the locked dependencies, for this machine's architecture unless
# KDP_IMAGE_ARCH names the other, cross-compiled), and the image's content and config come from the
# Dockerfile's final stage: the one copied file, ENTRYPOINT, CMD, USER and LABELs are read from
# it, so the two cannot drift apart. Prints the sizes (binary, compressed layer, tarball) and,
# as its last line, the tarball's path.
#
# Environment: CARGO_TARGET_DIR (cargo's build directory, as usual).
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(dirname "$HERE")
OUT=${1:?usage: build-image.sh OUT.tar [IMAGE-NAME]}
NAME=${2:-localhost/kubelet-device-plugins:dev}

say() { printf '%s [image] %s\n' "$(date +%T)" "$*" >&2; }

cd "$REPO"
host=$(rustc -vV | sed -n 's/^host: //p')
case ${KDP_IMAGE_ARCH:-$host} in
  x86_64-*|amd64) arch=amd64 ;;
  aarch64-*|arm64) arch=arm64 ;;
  *) say "error: no image architecture known for ${KDP_IMAGE_ARCH:-$host}"; exit 1 ;;
esac
say "static release build for $arch"
bin=$(bash build/static.sh "$arch" | tail -n 1)
# A static binary has no interpreter: the scratch image has no loader to give it one.
if file_out=$(LC_ALL=C readelf -l "$bin" 2>/dev/null) && grep -q 'Requesting program interpreter' <<<"$file_out"; then
  say "error: $bin is dynamically linked; the scratch image cannot run it"
  exit 1
fi

# The final stage of the Dockerfile, as oci_image.py arguments, one per line.
mapfile -t image_args < <(python3 - "$REPO/Dockerfile" "$bin" <<'PY'
import json, re, shlex, sys

dockerfile, binary = sys.argv[1], sys.argv[2]
lines, cur = [], ""
for raw in open(dockerfile):
    line = raw.rstrip("\n")
    if not cur and (not line.strip() or line.lstrip().startswith("#")):
        continue
    if line.endswith("\\"):
        cur += line[:-1] + " "
        continue
    lines.append(cur + line)
    cur = ""
# Only the last stage is the image.
last = max(i for i, l in enumerate(lines) if l.split()[0].upper() == "FROM")
if lines[last].split()[1] != "scratch":
    sys.exit("build-image.sh: the Dockerfile's final stage is not FROM scratch")
args, out = {}, []
for line in lines[last + 1:]:
    word, _, rest = line.strip().partition(" ")
    word = word.upper()
    if word == "ARG":
        k, _, v = rest.partition("=")
        args[k.strip()] = v.strip()
        continue
    rest = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), ""), rest)
    if word == "LABEL":
        for pair in shlex.split(rest):
            out.append("--label=" + pair)
    elif word == "COPY":
        parts = rest.split()
        if not parts[0].startswith("--from=") or len(parts) != 3:
            sys.exit(f"build-image.sh: unexpected COPY in the final stage: {line}")
        out.append(f"--file={binary}={parts[2]}:755")
    elif word in ("ENTRYPOINT", "CMD"):
        for a in json.loads(rest):
            out.append(f"--{word.lower()}={a}")
    elif word == "USER":
        out.append("--user=" + rest.strip())
    else:
        sys.exit(f"build-image.sh: {word} in the final stage is not handled here")
print("\n".join(out))
PY
)
((${#image_args[@]})) || { say "error: nothing read from the Dockerfile"; exit 1; }
mkdir -p "$(dirname "$OUT")"
python3 "$HERE/oci_image.py" --name "$NAME" --out "$OUT" --arch "$arch" "${image_args[@]}" >&2
layer=$(tar -tvf "$OUT" | awk '$3 > max { max = $3 } END { print max }')
size=$(stat -c %s "$bin")
say "binary $size bytes; compressed layer $layer bytes; tarball $(stat -c %s "$OUT") bytes ($NAME)"
# The deployment issue's bound: the image, unpacked, under 20 MB (it is this one file).
if ((size >= 20000000)); then
  say "error: the image would hold $size bytes, over the 20 MB budget"
  exit 1
fi
echo "$OUT"
