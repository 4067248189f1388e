#!/usr/bin/env bash
# Identity issuance benchmark: release build, pinned to one core. Not run by CI.
# Usage: hack/bench-identity.sh
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p trellis-operator --example bench-identity
exec taskset -c 0 target/release/examples/bench-identity
