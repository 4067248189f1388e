#!/usr/bin/env bash
# Regenerates sidecar/pgo/trellis-proxy.profdata.gz, the profile hack/build-proxy.sh optimises
# the sidecar with. Run it after changing the request path (a stale profile still builds, but
# functions whose code changed lose their profile and the gain with it). Not run by CI: about
# 12 minutes (an instrumented release build, then one quick round of hack/bench-proxy.sh).
#
# Training: the Trellis pair of hack/bench-proxy.py --quick, with both sidecars instrumented:
# HTTP/1.1 from oha at 1000 req/s over 16 connections, then saturation over 32 (where the hop
# between the sidecars goes to HTTP/2), then 20 config reloads under load. So the profile
# weighs the HTTP/1.1 and HTTP/2 request paths, mTLS record handling and reloads as a busy
# sidecar sees them; start-up and handshakes are there but small.
# Needs: what hack/bench-proxy.sh needs (nginx, openssl, python3; it installs oha), and
# llvm-profdata of the same LLVM major as rustc (Debian: apt-get install llvm-NN).
set -euo pipefail
cd "$(dirname "$0")/.."
root="$(pwd)"
target="${CARGO_TARGET_DIR:-$root/target}"
case "$target" in /*) ;; *) target="$root/$target" ;; esac

llvm_major=$(rustc -vV | sed -n 's/^LLVM version: \([0-9]*\).*/\1/p')
profdata="${LLVM_PROFDATA:-}"
if [ -z "$profdata" ]; then
  for c in "llvm-profdata-$llvm_major" "/usr/lib/llvm-$llvm_major/bin/llvm-profdata"; do
    if command -v "$c" >/dev/null 2>&1; then profdata="$c"; break; fi
  done
fi
if [ -z "$profdata" ]; then
  echo "pgo: no llvm-profdata for LLVM $llvm_major (rustc's); apt-get install llvm-$llvm_major," \
       "or set LLVM_PROFDATA" >&2
  exit 1
fi

gen="$target/pgo-gen"
raw="$gen/profraw"
rm -rf "$raw"
mkdir -p "$raw"
RUSTFLAGS="${RUSTFLAGS:-} -Cprofile-generate=$raw" \
  cargo build --release --locked -p trellis-proxy --bin trellis-proxy --target-dir "$gen"
# Each proxy writes its counters when it exits (SIGTERM, as the harness stops it).
LLVM_PROFILE_FILE="$raw/proxy-%p-%m.profraw" TRELLIS_PROXY="$gen/release/trellis-proxy" \
  OUT="$gen/bench" hack/bench-proxy.sh --quick --pairs trellis
shopt -s nullglob
profiles=("$raw"/proxy-*.profraw)
if [ "${#profiles[@]}" -eq 0 ]; then
  echo "pgo: no proxy wrote a profile to $raw (did they exit on SIGTERM?)" >&2
  exit 1
fi
"$profdata" merge -o "$gen/trellis-proxy.profdata" "${profiles[@]}"
mkdir -p sidecar/pgo
gzip -9n -c "$gen/trellis-proxy.profdata" > sidecar/pgo/trellis-proxy.profdata.gz
echo "pgo: sidecar/pgo/trellis-proxy.profdata.gz from ${#profiles[@]} proxies at" \
     "$(git rev-parse --short HEAD)$(git diff --quiet -- sidecar || echo -dirty)"
