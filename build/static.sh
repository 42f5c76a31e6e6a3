#!/usr/bin/env bash
# The image's binary: a static release build of kubelet-device-plugins for one architecture, from
# the locked dependencies. The Dockerfile's build stage runs it once per platform, on the build
# machine's own architecture (cross-compiling, never emulating), and integration/build-image.sh
# runs it here, so both make the binary the same way.
#
#   build/static.sh ARCH [OUT]   ARCH: amd64 or arm64 (Docker's TARGETARCH); OUT: a copy's path
#
# Prints the stripped binary's path (OUT, or beside where cargo left it) as its last line; cargo's
# output goes to stderr.
#
# A cross build needs the target's C and C++ compilers and C library, from Debian's packages
# (the Dockerfile installs them): gcc/g++-aarch64-linux-gnu and libc6-dev-arm64-cross for arm64,
# gcc/g++-x86-64-linux-gnu and libc6-dev-amd64-cross for amd64. Environment: CARGO_TARGET_DIR.
set -euo pipefail
arch=${1:?usage: build/static.sh ARCH [OUT]} out=${2:-}
case $arch in
  amd64) target=x86_64-unknown-linux-gnu gnu=x86_64-linux-gnu ;;
  arm64) target=aarch64-unknown-linux-gnu gnu=aarch64-linux-gnu ;;
  *) echo "build/static.sh: unsupported architecture $arch (amd64 or arm64)" >&2; exit 2 ;;
esac
host=$(rustc -vV | sed -n 's/^host: //p')
if [[ $target != "$host" ]]; then
  rustup target list --installed | grep -qx "$target" || rustup target add "$target" >&2
  # The cc and cmake crates (gRPC's C core) read the compilers per target; cargo the linker.
  var=${target//-/_}
  export "CC_$var=$gnu-gcc" "CXX_$var=$gnu-g++" "AR_$var=$gnu-ar"
  upper=$(tr 'a-z-' 'A-Z_' <<<"$target")
  export "CARGO_TARGET_${upper}_LINKER=$gnu-gcc"
fi
# Statically linked (glibc, libstdc++ and all): the image holds nothing else. The plugin only
# uses Unix sockets and TCP to an address it is given, so glibc's static-linking caveats (NSS,
# name lookup) do not apply.
RUSTFLAGS="-C target-feature=+crt-static" \
  cargo build --release --locked --target "$target" --bin kubelet-device-plugins >&2
bin=${CARGO_TARGET_DIR:-target}/$target/release/kubelet-device-plugins
# Cargo's build keeps its symbol table (build/order-symbols.sh reads the names); the copy the
# image gets has none.
strip_tool="strip"
if [[ $target != "$host" ]]; then
  strip_tool=$gnu-strip
fi
stripped=${out:-$bin.stripped}
"$strip_tool" --strip-all -o "$stripped" "$bin"
printf '%s\n' "$stripped"
