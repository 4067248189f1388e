#!/usr/bin/env bash
# P2C peak-EWMA versus round robin and least request with one 10x slower endpoint (scenarios
# 1 ms / 10 ms and 5 ms / 50 ms); prints one markdown table per scenario, a row per round and
# mode, and per round the P2C-EWMA p99 against the fast endpoints' p99 and the share sent to the
# slow endpoint. Not run by CI. Extra flags go to the benchmark: --rate N --secs N
# --warmup-secs N --rounds N (default 3), --fast-ms N --slow-ms N (one scenario instead), --trace
# (print, to stderr, what the balancer saw at each P2C-EWMA pick of the slow endpoint).
set -euo pipefail
cd "$(dirname "$0")/.."
exec cargo run --release -q -p trellis-proxy --example bench-lb -- "$@"
