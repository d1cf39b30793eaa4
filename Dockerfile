# syntax=docker/dockerfile:1
#
# Pylon's image, ghcr.io/pylon-mesh/pylon:<version>. One image holds all three binaries,
# because the injector (inject/) and deploy/control-plane/ run every role from it:
#
#   /usr/local/bin/pylon-proxy       the entrypoint: the sidecar proxy (uid 2102)
#   /usr/local/bin/pylon-proxy init  the init container's iptables step (args: init ...;
#                                    the pod runs it as uid 0 with NET_ADMIN and NET_RAW)
#   /usr/local/bin/pylon-controller  the control plane (command: in its Deployment)
#   /usr/local/bin/pylon             the CLI
#
#   docker build -t ghcr.io/pylon-mesh/pylon:0.1.0 .
#
# Nothing is written to the image's filesystem at run time (identities, certificates and
# configuration come from mounted volumes), so every container can run with
# readOnlyRootFilesystem: true. The runtime needs no shell: every entrypoint is exec form.

##
## Build: the three packages, from the locked dependency graph.
##
# The tag pins the toolchain CI tests with; it must stay >= the workspace's rust-version and
# every locked dependency's (tests/deploy_manifests.rs checks both).
FROM rust:1.95-bookworm AS builder
WORKDIR /src
COPY . .
# The proxy's build is profile-guided: llvm-profdata, of the toolchain's own LLVM, merges the
# counts its training run writes.
RUN rustup component add llvm-tools
# The registry and target caches need BuildKit (the default builder); the binaries are copied
# out of the cached target dir in the same step, with their debug info stripped (the release
# profile keeps line tables for local profiling; the image does not need them). The proxy, one
# per pod, is built by scripts/build-release-proxy: with the C library linked in (1.3 MiB less
# resident per proxy), and profile-guided (built with LLVM's counters, trained by the bench's
# `pylon-bench train` on loopback, built again: about a quarter fewer instructions per
# request; the script says how). The controller and the CLI are built as usual.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p pylon-controller -p pylon-cli \
    && proxy="$(scripts/build-release-proxy --locked)" \
    && mkdir -p /out \
    && cp "$proxy" target/release/pylon-controller target/release/pylon /out/ \
    && strip --strip-debug /out/pylon-proxy /out/pylon-controller /out/pylon

##
## Runtime: Debian slim (same release as the builder, so the same glibc) plus iptables, which
## `pylon-proxy init` runs. A distroless base would need iptables' binaries and libraries
## copied in piece by piece; slim installs them as Debian tests them.
##
FROM debian:bookworm-slim AS runtime
# Versions are not pinned: the base image's tag pins the Debian release, and a release's
# security updates replace the exact versions, which would break every later build.
# iptables defaults to its nft backend here; `pylon-proxy init --iptables iptables-legacy`
# picks the legacy one, whose lock file is made now so that a read-only root filesystem only
# has to open it. ca-certificates: the OS trust store, for a Kubernetes client configured
# without a CA of its own.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates iptables \
    && rm -rf /var/lib/apt/lists/* \
    && touch /run/xtables.lock

COPY --from=builder /out/pylon-proxy /usr/local/bin/pylon-proxy
COPY --from=builder /out/pylon-controller /usr/local/bin/pylon-controller
COPY --from=builder /out/pylon /usr/local/bin/pylon

LABEL org.opencontainers.image.title="pylon" \
      org.opencontainers.image.description="Pylon service-mesh proxy, init step, controller and CLI" \
      org.opencontainers.image.licenses="Apache-2.0"

# The proxy's uid: `pylon-proxy init --proxy-uid 2102` exempts its traffic from redirection.
USER 2102:2102
ENTRYPOINT ["/usr/local/bin/pylon-proxy"]
