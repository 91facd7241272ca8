# syntax=docker/dockerfile:1
#
# Mandate's images, one build, two runtime targets:
#
#   docker build --target proxy         -t ghcr.io/mandate-dev/mandate-proxy:0.1.0 .
#   docker build --target control-plane -t ghcr.io/mandate-dev/mandate:0.1.0 .
#
# `proxy` runs the sidecar (`mandate-proxy`, uid 1337: the uid `init-iptables` exempts from the
# redirect) and, as root with NET_ADMIN, the Kubernetes init container `mandate-proxy init-iptables`.
# `control-plane` runs `mandate serve` and the operator CLI (`mandate …`) as uid 10001.
# Both are debian:bookworm-slim with the stripped release binary and nothing to build with.

ARG RUST_VERSION=1.95
ARG DEBIAN_SUITE=bookworm

FROM rust:${RUST_VERSION}-slim-${DEBIAN_SUITE} AS builder
WORKDIR /src
# Symbols stripped at link time: the binaries shrink by about three quarters.
ENV CARGO_PROFILE_RELEASE_STRIP=symbols \
    CARGO_INCREMENTAL=0
COPY . .
# The registry and target directories are BuildKit cache mounts: a rebuild after a source change
# recompiles the workspace's crates, not its dependencies. Binaries are copied out of the cache.
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked -p mandate-proxy -p mandate-control-plane \
 && install -D -m 0755 -t /out target/release/mandate-proxy target/release/mandate

FROM debian:${DEBIAN_SUITE}-slim AS runtime-base
# ca-certificates: system roots for TLS to destinations outside the mesh and to PostgreSQL.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/*

FROM runtime-base AS proxy
# iptables: the same image runs `mandate-proxy init-iptables` as the Kubernetes init container.
RUN apt-get update \
 && apt-get install -y --no-install-recommends iptables \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 1337 mandate-proxy \
 && useradd --system --uid 1337 --gid 1337 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin mandate-proxy \
 && install -d -o 1337 -g 1337 -m 0700 /var/lib/mandate-proxy
COPY --from=builder /out/mandate-proxy /usr/local/bin/mandate-proxy
# /var/lib/mandate-proxy (owned by 1337) is there for --state-dir: mount a volume on it to keep key,
# SVID, bundle, last policy and the decision spool across restarts.
USER 1337:1337
# inbound mTLS, admin (/metrics, /healthz, /readyz; loopback unless --admin says otherwise)
EXPOSE 15006 15000
ENTRYPOINT ["mandate-proxy"]

FROM runtime-base AS control-plane
RUN groupadd --system --gid 10001 mandate \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin mandate \
 && install -d -o 10001 -g 10001 -m 0700 /var/lib/mandate
COPY --from=builder /out/mandate /usr/local/bin/mandate
# SQLite database, generated store key and admin token, and ca.pem for the CLI. The metrics
# listener (/metrics, /healthz, /readyz; no secrets) binds all interfaces: in a container loopback
# would hide it from probes and scrapers.
ENV MANDATE_DATA_DIR=/var/lib/mandate \
    MANDATE_METRICS=0.0.0.0:15014
VOLUME ["/var/lib/mandate"]
USER 10001:10001
# API (TLS), metrics/healthz/readyz (plain HTTP)
EXPOSE 15012 15014
ENTRYPOINT ["mandate"]
CMD ["serve"]
