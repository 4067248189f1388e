# Compiled sidecar config honours trellis.dev/export-to: a Service exported to its own namespace
# is listed there and nowhere else, and a policy on a Service no meshed namespace sees reports
# Programmed=False/NotVisible.
a=trellis-e2e-vis-a
b=trellis-e2e-vis-b
for ns in "$a" "$b"; do
  kc create namespace "$ns" --dry-run=client -o yaml | kc apply -f -
  kc label namespace "$ns" trellis.dev/inject=enabled --overwrite
done
cat <<YAML | kc apply -f -
apiVersion: v1
kind: Service
metadata:
  name: private-api
  namespace: $a
  annotations:
    trellis.dev/export-to: "."
spec:
  selector: {app: private-api}
  ports: [{name: http, port: 80}]
---
apiVersion: v1
kind: Service
metadata:
  name: hidden
  namespace: $a
  annotations:
    trellis.dev/export-to: "~"
spec:
  selector: {app: hidden}
  ports: [{name: http, port: 80}]
---
apiVersion: v1
kind: Service
metadata:
  name: public-api
  namespace: $b
spec:
  selector: {app: public-api}
  ports: [{name: http, port: 80}]
---
apiVersion: trellis.dev/v1alpha1
kind: TrafficPolicy
metadata:
  name: hidden
  namespace: $a
spec:
  targetRef: {name: hidden}
YAML

# config <ns>: the compiled config.json of a namespace (empty until written).
config() { kc get configmap trellis-proxy -n "$1" -o jsonpath='{.data.config\.json}' 2>/dev/null || true; }
# lists <text> <service>: whether a config lists the Service (no pipe: pipefail and grep -q race).
lists() { [[ "$1" == *"\"name\": \"$2\""* ]]; }
deadline=$((SECONDS + ${E2E_TIMEOUT%s}))
while :; do
  ca="$(config "$a")"
  cb="$(config "$b")"
  if lists "$ca" public-api && lists "$cb" public-api && lists "$ca" private-api; then
    break
  fi
  if [ "$SECONDS" -ge "$deadline" ]; then
    echo "e2e: the compiled configs never listed the expected Services" >&2
    echo "$ca" >&2
    exit 1
  fi
  sleep 2
done
if lists "$cb" private-api; then
  echo "e2e: $a/private-api (export-to: .) is listed in $b" >&2
  exit 1
fi
if lists "$ca" hidden; then
  echo "e2e: $a/hidden (export-to: ~) is listed in $a" >&2
  exit 1
fi
wait_for -n "$a" --for=jsonpath='{.status.conditions[?(@.type=="Programmed")].reason}'=NotVisible \
  trafficpolicy/hidden
if [ "${E2E_KEEP:-}" != 1 ]; then
  kc delete namespace "$a" "$b" --wait=false
fi
