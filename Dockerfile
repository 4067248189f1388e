# syntax=docker/dockerfile:1
# Trellis images, from one build of the workspace:
#   docker build --target operator -t ghcr.io/trellis-mesh/trellis-operator:0.1.0 .
#   docker build --target proxy    -t ghcr.io/trellis-mesh/trellis-proxy:0.1.0 .
# Both final images run as non-root users and carry no compiler, no package manager cache and
# (operator) no shell.

FROM rust:1.95-trixie AS build
WORKDIR /src
COPY . .
# --locked: exactly the dependency versions CI tested. The cache mounts only speed up rebuilds.
# The sidecar is built on its own by hack/build-proxy.sh, with the profile in sidecar/pgo/
# (profile-guided optimisation: about 0.73x the CPU per request, see sidecar/pgo/README.md) and in a
# target dir of its own, since its RUSTFLAGS differ.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin trellis-operator --bin trellis \
 && mkdir -p /out \
 && cp target/release/trellis-operator target/release/trellis /out/ \
 && cp "$(CARGO_TARGET_DIR=/src/target hack/build-proxy.sh)" /out/

# The operator: glibc + libgcc only (ring is C code linked dynamically against glibc). UID 65532
# matches config/manager/manager.yaml; the read-only root filesystem needs nothing writable.
FROM gcr.io/distroless/cc-debian13:nonroot AS operator
COPY --from=build /out/trellis-operator /out/trellis /usr/local/bin/
USER 65532:65532
EXPOSE 8080 9443 15012
ENTRYPOINT ["/usr/local/bin/trellis-operator"]

# The sidecar. `trellis-proxy init` (the init container, run as root with NET_ADMIN by the
# injector) needs iptables-restore; the proxy itself runs as UID 2137, whose traffic the
# redirect rules skip.
FROM debian:trixie-slim AS proxy
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends iptables nftables \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/trellis-proxy /usr/local/bin/
USER 2137:2137
EXPOSE 15001 15006 15020
ENTRYPOINT ["/usr/local/bin/trellis-proxy"]
