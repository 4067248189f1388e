#!/usr/bin/env bash
# Builds the sidecar as it ships: release, alone (no other package's features unified into it),
# and optimised with the profile in sidecar/pgo/ (profile-guided optimisation, issue 14: code laid
# out and inlined by where a request's time goes; see sidecar/pgo/README.md for what it bought
# and hack/pgo.sh to regenerate it). Used by the Dockerfile and hack/bench-proxy.sh.
# Output: $CARGO_TARGET_DIR/pgo-use/release/trellis-proxy (printed last). Its own target dir,
# because RUSTFLAGS differ from every other build: sharing one would rebuild everything each
# time the two alternate.
set -euo pipefail
cd "$(dirname "$0")/.."
root="$(pwd)"
target="${CARGO_TARGET_DIR:-$root/target}"
case "$target" in /*) ;; *) target="$root/$target" ;; esac
profile_gz="$root/sidecar/pgo/trellis-proxy.profdata.gz"
out="$target/pgo-use"
mkdir -p "$out"
# rustc reads the profile uncompressed; it is kept compressed in git (about a fifth the size).
gzip -dc "$profile_gz" > "$out/trellis-proxy.profdata.tmp"
if ! cmp -s "$out/trellis-proxy.profdata.tmp" "$out/trellis-proxy.profdata" 2>/dev/null; then
  mv "$out/trellis-proxy.profdata.tmp" "$out/trellis-proxy.profdata"
else
  rm "$out/trellis-proxy.profdata.tmp"
fi
RUSTFLAGS="${RUSTFLAGS:-} -Cprofile-use=$out/trellis-proxy.profdata" \
  cargo build --release --locked -p trellis-proxy --bin trellis-proxy --target-dir "$out" >&2
echo "$out/release/trellis-proxy"
