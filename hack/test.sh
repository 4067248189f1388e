#!/usr/bin/env bash
# The whole test suite: what CI runs (via .ci/run) and what you run before pushing.
set -euo pipefail
cd "$(dirname "$0")/.."

bash hack/install-deps.sh

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked
