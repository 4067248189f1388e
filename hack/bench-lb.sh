#!/usr/bin/env bash
# P2C peak-EWMA versus round robin with one 10x slower endpoint; prints a markdown table.
# Not run by CI. Extra flags go to the benchmark: --rate N --secs N --warmup-secs N
# --fast-ms N --slow-ms N --rounds N.
set -euo pipefail
cd "$(dirname "$0")/.."
exec cargo run --release -q -p trellis-proxy --example bench-lb -- "$@"
