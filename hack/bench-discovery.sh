#!/usr/bin/env bash
# Discovery at cluster scale (see hack/bench-discovery.rs): by default 1 000 namespaces,
# 10 000 Services, 100 000 endpoints, 1 000 simulated streams x 20 subscriptions, 50 endpoint
# changes. Arguments pass through: namespaces, Services per namespace, endpoints per Service,
# streams, subscriptions per stream, changes. Not run by CI.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo run --release -q -p trellis-operator --example bench-discovery -- "$@"
