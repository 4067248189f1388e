#!/usr/bin/env bash
# Sidecar benchmark (not run by CI): Trellis pair vs direct vs nginx pair vs HAProxy pair, in
# interleaved rounds, with oha as the load generator. See hack/bench-proxy.py for what it
# measures and its flags (--quick, --rounds N, --proxy-bin [LABEL=]PATH, --concurrency N,
# --pairs LIST, --tracing: the trellis pair also at 1 % and 100 % span sampling, issue #15).
# Needs: nginx haproxy openssl procps (apt-get install), python3, cargo (builds the release
# proxy, and installs oha once). Writes hack/out/bench-proxy.md and hack/out/bench-proxy.json.
# A full run (3 rounds, 4 configurations) takes about 5 minutes, 6 with one --proxy-bin,
# 7 with --tracing (two more configurations per round).
set -euo pipefail
cd "$(dirname "$0")/.."

# oha, pinned, from the Rust crate registry, under the same cache as the other tools
# (hack/validate-manifests.sh); 1.16.0 builds with Rust 1.95 (`--locked`: its own lockfile).
oha_version=1.16.0
cache="${TRELLIS_CACHE:-${HOME:-/root}/.cache/trellis}"
oha_root="$cache/oha-$oha_version"
if [ ! -x "$oha_root/bin/oha" ]; then
  mkdir -p "$cache"
  # Its own throwaway target dir: the workspace's CARGO_TARGET_DIR is not for tools.
  env -u CARGO_TARGET_DIR cargo install oha --version "$oha_version" --locked \
    --root "$oha_root"
fi
export OHA="$oha_root/bin/oha"

target="${CARGO_TARGET_DIR:-target}"
# Two builds, the proxy alone: built in one invocation with an example, the binary gets the
# features the dev-dependencies turn on in shared crates (cargo unifies them), and is then not
# the binary that ships (2026-11-30: 0.46 MB more code, 0.19 MB more data). The proxy as the
# Dockerfile builds it (hack/build-proxy.sh: with its profile), unless TRELLIS_PROXY names one.
cargo build --release -p trellis-proxy --example bench-load
if [ -z "${TRELLIS_PROXY:-}" ]; then
  TRELLIS_PROXY="$(hack/build-proxy.sh)"
fi
export TRELLIS_PROXY
export TRELLIS_LOAD="${TRELLIS_LOAD:-$target/release/examples/bench-load}"
exec python3 hack/bench-proxy.py "$@"
