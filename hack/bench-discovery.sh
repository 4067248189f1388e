#!/usr/bin/env bash
# Discovery at cluster scale (see hack/bench-discovery.rs): by default 1 000 namespaces,
# 10 000 Services, 100 000 endpoints, 1 000 simulated streams x 20 subscriptions, 50 endpoint
# changes. Arguments pass through: namespaces, Services per namespace, endpoints per Service,
# streams, subscriptions per stream, changes, pods (1: a meshed pod behind every endpoint,
# held in the operator's own pod cache). Not run by CI.
#
# Builds in release (a debug build is several times slower and measures the wrong thing; set
# PROFILE=dev to compare), runs the benchmark RUNS times (default 3) and prints each run's
# figures, the load average before each run (the machine may be shared), and the medians.
set -euo pipefail
cd "$(dirname "$0")/.."
profile="${PROFILE:-release}"
runs="${RUNS:-3}"
cargo build -q --profile "$profile" -p trellis-operator --example bench-discovery
dir="${CARGO_TARGET_DIR:-target}/$([ "$profile" = dev ] && echo debug || echo "$profile")"
results=()
for i in $(seq 1 "$runs"); do
    echo "--- run $i/$runs ($profile), load average: $(cut -d' ' -f1-3 /proc/loadavg)"
    out="$("$dir/examples/bench-discovery" "$@")"
    echo "$out"
    results+=("$(grep '^RESULT ' <<<"$out")")
done
echo "--- medians of $runs runs ($profile), load average now: $(cut -d' ' -f1-3 /proc/loadavg)"
for key in rss_mib peak_mib objects_mib pods_mib compiled_mib boot_max_kib p50_ms p99_ms compile_ms publish_ms scratch_index_ms scratch_publish_ms; do
    printf '%s\n' "${results[@]}" | grep -o " $key=[0-9.]*" | cut -d= -f2 | sort -g |
        awk -v k="$key" '{ v[NR] = $1 } END { printf "%s %s\n", k, (NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2) }'
done
