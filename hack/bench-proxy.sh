#!/usr/bin/env bash
# Sidecar benchmark (not run by CI): trellis pair vs direct vs nginx pair vs HAProxy pair.
# Needs: nginx haproxy openssl (apt-get install), python3. The load generator is
# hack/bench-load.rs (fixed rate, coordinated-omission corrected; wrk2 is not in Debian).
# Writes hack/out/bench-proxy.md (table) and hack/out/bench-proxy.json (raw).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p trellis-proxy --bin trellis-proxy --example bench-load
exec python3 hack/bench-proxy.py "$@"
