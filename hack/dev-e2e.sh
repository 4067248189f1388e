#!/usr/bin/env bash
# One bounded `trellis dev` run (the README's Quick start) shared by the tests that need a live
# local mesh, so CI starts the mesh once:
#   - the run itself must end with every edge having carried mTLS traffic (its exit code);
#   - the dashboard in headless Chromium: every demo edge drawn and listed with a success rate,
#     the legacy edge marked plaintext; after `shop`'s PeerAuthentication is edited to Strict
#     during the run, the legacy edge shows refusals. Screenshots go to $OUT.
# Usage: bash hack/dev-e2e.sh   (OUT=hack/out/dev-e2e DURATION=60s)
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-hack/out/dev-e2e}
DURATION=${DURATION:-60s}
BASE_PORT=${BASE_PORT:-17400}
DASHBOARD_PORT=${DASHBOARD_PORT:-17390}
mkdir -p "$OUT"
cargo build --locked --bin trellis
BIN="${CARGO_TARGET_DIR:-target}/debug/trellis"

work=$(mktemp -d)
cp -r examples/demo "$work/demo"
"$BIN" dev "$work/demo" --duration "$DURATION" --base-port "$BASE_PORT" \
  --dashboard-port "$DASHBOARD_PORT" >"$OUT/dev.log" 2>&1 &
dev=$!
cleanup() {
  kill "$dev" 2>/dev/null || true
  wait "$dev" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
URL="http://127.0.0.1:$DASHBOARD_PORT/"

# Waits (at most $2 s) until /api/graph satisfies the Python expression $1 over `g`.
wait_graph() {
  local cond=$1 limit=$2 i
  for ((i = 0; i < limit * 2; i++)); do
    if curl -fsS "${URL}api/graph" 2>/dev/null | python3 -c "
import json, sys
g = json.load(sys.stdin)
e = {x['source'] + '->' + x['destination']: x for x in g['edges']}
sys.exit(0 if ($cond) else 1)" 2>/dev/null; then
      return 0
    fi
    sleep 0.5
  done
  echo "dev-e2e: timed out waiting for: $cond" >&2
  tail -40 "$OUT/dev.log" >&2
  return 1
}

chrome() {
  local profile
  profile=$(mktemp -d)
  timeout 60 chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
    --disable-background-networking --disable-component-update --disable-sync \
    --user-data-dir="$profile" --virtual-time-budget=3000 --window-size=1400,900 "$@" \
    2>>"$OUT/chromium.log"
  rm -rf "$profile"
}

MESHED=(load.shop-\>frontend.shop=mtls frontend.shop-\>catalog.shop=mtls
  frontend.shop-\>reviews.shop=mtls)
LEGACY=legacy.shop-\>frontend.shop

echo "dev-e2e: waiting for traffic on every edge ($URL)"
wait_graph "all(e.get(k, {}).get('success') is not None for k in
  ['load.shop->frontend.shop', 'frontend.shop->catalog.shop', 'frontend.shop->reviews.shop',
   'legacy.shop->frontend.shop'])" 40
chrome --dump-dom "$URL" >"$OUT/dom-permissive.html"
python3 hack/dashboard_dom.py "$OUT/dom-permissive.html" "${MESHED[@]}" "$LEGACY=plaintext"
chrome --screenshot="$OUT/dashboard.png" "$URL"
# The checker must fail on a wrong marking and on a missing edge, or it proves nothing.
if python3 hack/dashboard_dom.py "$OUT/dom-permissive.html" "$LEGACY=mtls" >/dev/null ||
  python3 hack/dashboard_dom.py "$OUT/dom-permissive.html" "catalog.shop->reviews.shop=mtls" >/dev/null; then
  echo "dev-e2e: the DOM checker accepted a wrong marking or a missing edge" >&2
  exit 1
fi

echo "dev-e2e: shop PeerAuthentication Permissive -> Strict"
sed -i 's/mode: Permissive/mode: Strict/' "$work/demo/peer-authentication.yaml"
wait_graph "e['$LEGACY']['transport'] == 'refused'" 20
chrome --dump-dom "$URL" >"$OUT/dom-strict.html"
python3 hack/dashboard_dom.py "$OUT/dom-strict.html" "${MESHED[@]}" "$LEGACY=refused"
chrome --screenshot="$OUT/dashboard-strict.png" "$URL"

echo "dev-e2e: waiting for the bounded run to finish"
trap - EXIT
status=0
wait "$dev" || status=$?
rm -rf "$work"
tail -3 "$OUT/dev.log"
exit "$status"
