# syntax=docker/dockerfile:1
#
# mediagate container image: a release build on Debian bookworm, run on distroless (glibc,
# CA certificates, no shell, no package manager) as the unprivileged "nonroot" user.
#
#   docker build -t ghcr.io/example/mediagate:0.1.0 .
#   docker buildx build --platform linux/amd64,linux/arm64 -t ghcr.io/example/mediagate:0.1.0 --push .
#
# Multi-arch: nothing names an architecture. Each platform builds natively in its own
# stage (under QEMU emulation when it is not the builder's own), with its own target/ cache.
#
# Pinned bases: the Rust toolchain by its exact version (the one the tests run with), the
# runtime by distroless's Debian-12 "nonroot" tag. For reproducible images pin both by
# digest as well, e.g. --build-arg RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot@sha256:...
# (`docker buildx imagetools inspect gcr.io/distroless/cc-debian12:nonroot` prints it).
#
# The manifests (manifests/mediagate/deployment.yaml) run it with a read-only root filesystem
# and every capability dropped: all its ports are above 1024 and it writes nothing to disk.

ARG RUST_VERSION=1.95.0
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot

# ---------------------------------------------------------------------------- build
FROM rust:${RUST_VERSION}-bookworm AS build
# Set by BuildKit to the platform being built (amd64, arm64, ...): keys the target/ cache.
ARG TARGETARCH
WORKDIR /src

# clang + libbpf headers: build.rs compiles the kernel fast path (bpf/udp_offload.c) into
# the binary. It stays off unless a listener says `offload: ebpf` (or the
# manifests/components/ebpf-offload component sets MEDIAGATE_UDP_OFFLOAD=ebpf).
# Versions come from the pinned bookworm base image's suite; pinning Debian revisions here
# would break the build at the next point release, for a build-only tool.
# hadolint ignore=DL3008
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends clang llvm libbpf-dev \
 && rm -rf /var/lib/apt/lists/*

# The whole crate (.dockerignore keeps out target/, .git, manifests/, docs/ ...): Cargo.toml
# may name benches and tests, and cargo wants their files present even for `build`.
COPY . .

# BuildKit cache mounts keep the registry and target/ between builds, so a source change only
# recompiles mediagate itself. The binary is copied out of the cache mount to /out.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target,id=mediagate-target-${TARGETARCH} \
    MEDIAGATE_REQUIRE_BPF=1 cargo build --release --locked --bin mediagate \
 && install -D -m 0755 target/release/mediagate /out/mediagate \
 && strip --strip-debug /out/mediagate

# ---------------------------------------------------------------------------- runtime
# No HEALTHCHECK: Kubernetes ignores it; the Deployment probes /healthz and /readyz.
FROM ${RUNTIME_IMAGE}

LABEL org.opencontainers.image.title="mediagate" \
      org.opencontainers.image.description="Active-passive failover UDP/TCP load balancer and TURN server for WebRTC media gateways"

COPY --from=build /out/mediagate /usr/local/bin/mediagate

ENV MEDIAGATE_CONFIG=/etc/mediagate/mediagate.yaml
# admin API, Janus HTTP/WebSocket, RTP ingest, TURN (mediagate), coturn behind mediagate
EXPOSE 8086/tcp 8088/tcp 8188/tcp 5004-5007/udp 3478/udp 3478/tcp 3479/udp 3479/tcp

# 65532:65532 is "nonroot" in distroless; numeric, so that runAsNonRoot can verify it.
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/mediagate"]
CMD ["run"]
