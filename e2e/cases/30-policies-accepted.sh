# TrafficPolicy and PeerAuthentication are reconciled and report Accepted for their generation.
ns=trellis-e2e
kc create namespace "$ns" --dry-run=client -o yaml | kc apply -f -
cat <<YAML | kc apply -f -
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: $ns
spec:
  selector:
    app: web
  ports:
    - port: 80
---
apiVersion: trellis.dev/v1alpha1
kind: TrafficPolicy
metadata:
  name: web
  namespace: $ns
spec:
  targetRef:
    name: web
  retries:
    attempts: 2
---
apiVersion: trellis.dev/v1alpha1
kind: PeerAuthentication
metadata:
  name: default
  namespace: $ns
spec:
  mtls:
    mode: Permissive
YAML
wait_for -n "$ns" --for condition=Accepted trafficpolicy/web peerauthentication/default
if [ "${E2E_KEEP:-}" != 1 ]; then
  kc delete namespace "$ns" --wait=false
fi
