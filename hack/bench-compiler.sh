#!/usr/bin/env bash
# Compiler benchmark (release build, one thread; not run by CI): synthetic cluster of
# 1 000 Services, 10 000 endpoints, 200 namespaces, 500 TrafficPolicies. Prints a table with
# full and incremental compile times, the number of namespaces each change rewrites, and the
# RSS of the process holding the snapshot. The baseline (serializing every config from a value)
# is measured in the same run. Pin to one core with taskset when available.
set -euo pipefail
cd "$(dirname "$0")/.."

pin=()
if command -v taskset >/dev/null 2>&1; then
  pin=(taskset -c 0)
fi
cargo test --release -p trellis-operator --test compiler_bench --no-run
bin=$(cargo test --release -p trellis-operator --test compiler_bench --no-run --message-format=json 2>/dev/null \
  | grep -o '"executable":"[^"]*compiler_bench[^"]*"' | tail -1 | cut -d'"' -f4)
"${pin[@]}" "$bin" --ignored --exact bench_compiler --nocapture --test-threads=1
