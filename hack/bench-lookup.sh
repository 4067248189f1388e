#!/usr/bin/env bash
# Destination lookup per connection with 10 vs 10 000 Services: the per-config index against
# the linear scan it replaced; prints a markdown table. Not run by CI. Flags: --rounds N.
set -euo pipefail
cd "$(dirname "$0")/.."
exec cargo run --release -q -p trellis-proxy --example bench-lookup -- "$@"
