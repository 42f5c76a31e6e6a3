# syntax=docker/dockerfile:1
# The kubelet-device-plugins image: a static release build in a pinned Rust image, then that one
# file on an empty base. Multi-arch: docker buildx build --platform linux/amd64,linux/arm64 .
# (each platform builds natively for its own target).

FROM docker.io/library/rust:1.95.0-slim-bookworm AS build
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# gRPC's C core is built with cmake and a C++ compiler.
RUN apt-get update \
    && apt-get install -y --no-install-recommends cmake=3.25.1-1 g++=4:12.2.0-3 make=4.3-4.1 \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto proto
COPY src src
# Cargo checks that every declared target exists, the benchmark included.
COPY benches benches
COPY tests/support tests/support
# Statically linked (glibc, libstdc++ and all): the final image holds nothing else. The plugin
# only uses Unix sockets, so glibc's static-linking caveats (NSS, DNS) do not apply.
RUN target="$(rustc -vV | sed -n 's/^host: //p')" \
    && RUSTFLAGS="-C target-feature=+crt-static" \
       cargo build --release --locked --target "$target" --bin kubelet-device-plugins \
    && cp "target/$target/release/kubelet-device-plugins" /kubelet-device-plugins

FROM scratch
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="kubelet-device-plugins" \
      org.opencontainers.image.description="Kubernetes device plugin serving /dev/kvm, /dev/net/tun, /dev/vhost-net, /dev/vhost-vsock, /dev/fuse and configured device nodes" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/kubelet-device-plugins/kubelet-device-plugins"
COPY --from=build /kubelet-device-plugins /kubelet-device-plugins
# Root, but with every capability dropped by the DaemonSet: the kubelet's socket directories are
# root-owned and 0755, and a non-root user would need CAP_DAC_OVERRIDE instead, which is more.
# hadolint ignore=DL3002
USER 0:0
ENTRYPOINT ["/kubelet-device-plugins"]
CMD ["serve"]
