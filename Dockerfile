# syntax=docker/dockerfile:1
# The kubelet-device-plugins image: a static release build in a pinned Rust image, then that one
# file on an empty base. Multi-arch: docker buildx build --platform linux/amd64,linux/arm64 .
# The build stage runs on the build machine's own platform and cross-compiles for each target
# (as fast as a native build; emulating the other architecture would take hours for gRPC's core).

FROM --platform=$BUILDPLATFORM docker.io/library/rust:1.95.0-slim-bookworm AS build
ARG TARGETARCH
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# gRPC's C core is built with cmake and a C++ compiler; for another architecture, that one's
# compilers and C library too (Debian's cross packages).
RUN apt-get update \
    && apt-get install -y --no-install-recommends cmake=3.25.1-1 g++=4:12.2.0-3 make=4.3-4.1 \
    && host="$(dpkg --print-architecture)" \
    && case "${TARGETARCH:-$host}" in \
         "$host") ;; \
         arm64) apt-get install -y --no-install-recommends \
                  g++-aarch64-linux-gnu=4:12.2.0-3 libc6-dev-arm64-cross=2.36-8cross1 ;; \
         amd64) apt-get install -y --no-install-recommends \
                  g++-x86-64-linux-gnu=4:12.2.0-3 libc6-dev-amd64-cross=2.36-8cross1 ;; \
         *) echo "no cross toolchain for ${TARGETARCH}" >&2; exit 1 ;; \
       esac \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto proto
COPY src src
# Cargo checks that every declared target exists, the benchmark included.
COPY benches benches
COPY tests/support tests/support
COPY build/static.sh build/symbol-order.txt build/
# The same script integration/build-image.sh runs: static (glibc, libstdc++ and all), so the
# final image holds nothing else.
RUN bash build/static.sh "${TARGETARCH:-$(dpkg --print-architecture)}" /kubelet-device-plugins

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
