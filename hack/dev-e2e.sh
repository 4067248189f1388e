#!/usr/bin/env bash
# One bounded `trellis dev` run (the README's Quick start) shared by the tests that need a live
# local mesh, so CI starts the mesh once:
#   - the run itself must end with every edge having carried mTLS traffic (its exit code);
#   - the dashboard in headless Chromium: every demo edge drawn and listed with a success rate
#     (the opaque TCP edge warmer -> cache included), the legacy edge marked plaintext; after
#     `shop`'s PeerAuthentication is edited to Strict during the run, the legacy edge shows
#     refusals. Screenshots go to $OUT;
#   - a real Prometheus (Debian's, on loopback, temp dir, 1 h retention, stopped at the end)
#     scrapes the run's sidecars and its operator metrics (the scrape config trellis dev
#     writes): `trellis stat` must report every meshed edge (the opaque TCP one included),
#     and `trellis dashboard --prometheus` must draw them in Chromium too;
#   - once `shop` is Strict (so refusals have series too), the same Prometheus answers every
#     Grafana dashboard query and alert expression shipped in operator/src/addons/assets (the
#     operator's ignored `addons::assets::check::live` test: series for each, the operator's and
#     opaque TCP's included, the failing catalog replica visible, broken copies refused); the
#     alert rules also pass `promtool check rules` and `promtool test rules` first.
# Usage: bash hack/dev-e2e.sh   (OUT=hack/out/dev-e2e DURATION=75s)
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-hack/out/dev-e2e}
DURATION=${DURATION:-75s}
BASE_PORT=${BASE_PORT:-17400}
DASHBOARD_PORT=${DASHBOARD_PORT:-17390}
PROM_PORT=${PROM_PORT:-17391}
PROM_DASHBOARD_PORT=${PROM_DASHBOARD_PORT:-17392}
mkdir -p "$OUT"
ASSETS=operator/src/addons/assets
promtool check rules "$ASSETS/alerts.yaml"
promtool test rules "$ASSETS/alerts_test.yaml"
cargo build --locked --bin trellis
# The live dashboard check is a lib test: built before the bounded run starts, with the flags
# of hack/test.sh's `cargo test --workspace --locked`, so CI reuses that build.
cargo test --workspace --locked --lib --no-run
BIN="${CARGO_TARGET_DIR:-target}/debug/trellis"

work=$(mktemp -d)
cp -r examples/demo "$work/demo"
"$BIN" dev "$work/demo" --duration "$DURATION" --base-port "$BASE_PORT" \
  --dashboard-port "$DASHBOARD_PORT" --state-dir "$work/state" >"$OUT/dev.log" 2>&1 &
dev=$!
prom=
promdash=
# shellcheck disable=SC2317  # called by the EXIT trap
cleanup() {
  for p in $promdash $prom $dev; do kill "$p" 2>/dev/null || true; done
  for p in $promdash $prom $dev; do wait "$p" 2>/dev/null || true; done
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
# Opaque TCP: trellis dev's graph, `trellis stat` and `trellis dashboard --prometheus` read it
# from the sidecars' trellis_proxy_tcp_connections_total (connections as requests).
TCP=warmer.shop-\>cache.shop
LEGACY=legacy.shop-\>frontend.shop

echo "dev-e2e: waiting for traffic on every edge ($URL)"
wait_graph "all(e.get(k, {}).get('success') is not None for k in
  ['load.shop->frontend.shop', 'frontend.shop->catalog.shop', 'frontend.shop->reviews.shop',
   'legacy.shop->frontend.shop', 'warmer.shop->cache.shop'])" 40
chrome --dump-dom "$URL" >"$OUT/dom-permissive.html"
python3 hack/dashboard_dom.py "$OUT/dom-permissive.html" "${MESHED[@]}" "$TCP=mtls" \
  "$LEGACY=plaintext"
chrome --screenshot="$OUT/dashboard.png" "$URL"
# The checker must fail on a wrong marking and on a missing edge, or it proves nothing.
if python3 hack/dashboard_dom.py "$OUT/dom-permissive.html" "$LEGACY=mtls" >/dev/null ||
  python3 hack/dashboard_dom.py "$OUT/dom-permissive.html" "catalog.shop->reviews.shop=mtls" >/dev/null; then
  echo "dev-e2e: the DOM checker accepted a wrong marking or a missing edge" >&2
  exit 1
fi

# Prometheus scrapes the sidecars with the config trellis dev wrote, every second.
for ((i = 0; i < 40; i++)); do
  [ -f "$work/state/prometheus.yml" ] && break
  sleep 0.5
done
sed 's/scrape_interval: 5s/scrape_interval: 1s/' "$work/state/prometheus.yml" >"$work/prometheus.yml"
prometheus --config.file="$work/prometheus.yml" --storage.tsdb.path="$work/prom" \
  --storage.tsdb.retention.time=1h --web.listen-address="127.0.0.1:$PROM_PORT" \
  >"$OUT/prometheus.log" 2>&1 &
prom=$!
PROM="http://127.0.0.1:$PROM_PORT"
echo "dev-e2e: trellis stat against $PROM"
ok=
for ((i = 0; i < 60; i++)); do
  if "$BIN" stat --prometheus "$PROM" --window 15s -o json >"$OUT/stat.json" 2>"$OUT/stat.err" &&
    python3 - "$OUT/stat.json" <<'PY'
import json, sys
st = json.load(open(sys.argv[1]))
e = {(x["source"], x["destination"]): x for x in st["edges"]}
want = [("load.shop", "frontend.shop"), ("frontend.shop", "catalog.shop"), ("frontend.shop", "reviews.shop"),
        ("warmer.shop", "cache.shop")]
bad = [k for k in want if not (k in e and e[k]["mtls"] and e[k]["rps"] > 0 and e[k]["success"] is not None)]
plain = e.get(("(no sidecar)", "frontend.shop"))
bad += [] if plain and not plain["mtls"] and plain["rps"] > 0 else ["plaintext into frontend.shop"]
w = {x["workload"] + "." + x["namespace"] for x in st["workloads"]}
bad += [x for x in ["frontend.shop", "catalog.shop", "reviews.shop", "cache.shop"] if x not in w]
sys.exit(1 if bad else 0)
PY
  then
    ok=1
    break
  fi
  sleep 1
done
if [ -z "$ok" ]; then
  echo "dev-e2e: trellis stat never showed every edge:" >&2
  cat "$OUT/stat.json" "$OUT/stat.err" >&2
  exit 1
fi
"$BIN" stat --prometheus "$PROM" --window 15s | tee "$OUT/stat.txt"
"$BIN" stat deploy/catalog --prometheus "$PROM" --window 15s >"$OUT/stat-catalog.txt"
grep -q "frontend.shop -> catalog.shop" "$OUT/stat-catalog.txt"
if grep -q "load.shop -> frontend.shop" "$OUT/stat-catalog.txt"; then
  echo "dev-e2e: trellis stat deploy/catalog shows unrelated edges" >&2
  exit 1
fi

echo "dev-e2e: trellis dashboard --prometheus"
"$BIN" dashboard --prometheus "$PROM" --port "$PROM_DASHBOARD_PORT" --window 15s \
  >"$OUT/dashboard-prometheus.log" 2>&1 &
promdash=$!
sleep 4
PURL="http://127.0.0.1:$PROM_DASHBOARD_PORT/"
chrome --dump-dom "$PURL" >"$OUT/dom-prometheus.html"
python3 hack/dashboard_dom.py "$OUT/dom-prometheus.html" "${MESHED[@]}" "$TCP=mtls" \
  "(no sidecar)->frontend.shop=plaintext"
chrome --screenshot="$OUT/dashboard-prometheus.png" "$PURL"
kill "$promdash"
wait "$promdash" 2>/dev/null || true
promdash=

echo "dev-e2e: shop PeerAuthentication Permissive -> Strict"
sed -i 's/mode: Permissive/mode: Strict/' "$work/demo/peer-authentication.yaml"
wait_graph "e['$LEGACY']['transport'] == 'refused'" 20
chrome --dump-dom "$URL" >"$OUT/dom-strict.html"
python3 hack/dashboard_dom.py "$OUT/dom-strict.html" "${MESHED[@]}" "$TCP=mtls" "$LEGACY=refused"
chrome --screenshot="$OUT/dashboard-strict.png" "$URL"

echo "dev-e2e: dashboards and alerts against $PROM"
TRELLIS_LIVE_PROMETHEUS="$PROM" cargo test --workspace --locked --lib -- --ignored --exact \
  addons::assets::check::live --nocapture 2>&1 | tee "$OUT/dashboards-live.txt"

echo "dev-e2e: waiting for the bounded run to finish"
kill "$prom"
wait "$prom" 2>/dev/null || true
prom=
trap - EXIT
status=0
wait "$dev" || status=$?
rm -rf "$work"
tail -3 "$OUT/dev.log"
exit "$status"
