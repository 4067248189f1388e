# A meshed client calls a meshed server over mTLS, and under Strict an unmeshed caller is
# refused. The sidecars get their certificates from the identity endpoint in the operator's
# namespace, which their compiled config names.
n=trellis-e2e-mtls
plain=trellis-e2e-plain
for ns in "$n" "$plain"; do
  kc create namespace "$ns" --dry-run=client -o yaml | kc apply -f -
done
# trellis-init needs NET_ADMIN: the meshed namespace must allow privileged pods.
kc label namespace "$n" trellis.dev/inject=enabled pod-security.kubernetes.io/enforce=privileged --overwrite
cat <<YAML | kc apply -f -
apiVersion: trellis.dev/v1alpha1
kind: PeerAuthentication
metadata:
  name: default
  namespace: $n
spec:
  mtls:
    mode: Strict
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: client, namespace: $n}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: echo, namespace: $n}
spec:
  selector: {matchLabels: {app: echo}}
  template:
    metadata: {labels: {app: echo}}
    spec:
      containers:
        - name: echo
          image: registry.k8s.io/e2e-test-images/agnhost:2.53
          args: [netexec, --http-port=8080]
          ports: [{containerPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: $n}
spec:
  selector: {app: echo}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: client, namespace: $n}
spec:
  selector: {matchLabels: {app: client}}
  template:
    metadata: {labels: {app: client}}
    spec:
      serviceAccountName: client
      containers:
        - name: client
          image: curlimages/curl:8.11.1
          command: [sleep, "86400"]
YAML
kc -n "$n" rollout status deploy/echo --timeout="$E2E_TIMEOUT"
kc -n "$n" rollout status deploy/client --timeout="$E2E_TIMEOUT"

pod="$(kc -n "$n" get pod -l app=echo -o jsonpath='{.items[0].metadata.name}')"
sidecar="$(kc -n "$n" get pod "$pod" -o jsonpath='{.spec.initContainers[?(@.name=="trellis-proxy")].name}')"
if [ "$sidecar" != trellis-proxy ]; then
  echo "e2e: $n/$pod has no trellis-proxy sidecar" >&2
  exit 1
fi
config="$(kc -n "$n" get configmap trellis-proxy -o jsonpath='{.data.config\.json}')"
if [[ "$config" != *"trellis-operator.$E2E_NAMESPACE.svc"* ]]; then
  echo "e2e: the sidecar config does not name the identity endpoint in $E2E_NAMESPACE" >&2
  exit 1
fi

call() { kc -n "$n" exec deploy/client -c client -- curl -fsS --max-time 5 http://echo/hostname >/dev/null; }
wait_until "the meshed client reaches echo" call
# The server's sidecar saw the call over mTLS, from the client's SPIFFE identity.
peer="spiffe://cluster.local/ns/$n/sa/client"
metrics="$(kc get --raw "/api/v1/namespaces/$n/pods/$pod:15020/proxy/metrics")"
if ! grep -F 'direction="inbound"' <<<"$metrics" | grep -F "peer_identity=\"$peer\"" | grep -qF 'tls="true"'; then
  echo "e2e: echo's sidecar counted no inbound mTLS request from $peer:" >&2
  grep -F requests_total <<<"$metrics" >&2 || true
  exit 1
fi

# An unmeshed caller: Strict refuses its plaintext. The refusal must come from curl (the pod
# ran and connected), not from the pod failing to start.
if out="$(kubectl -n "$plain" run plain-caller --image=curlimages/curl:8.11.1 --restart=Never \
  --rm -i --pod-running-timeout="$E2E_TIMEOUT" \
  --command -- curl -fsS --max-time 5 "http://echo.$n/hostname" 2>&1)"; then
  echo "e2e: an unmeshed caller reached $n/echo under Strict mTLS: $out" >&2
  exit 1
fi
if [[ "$out" != *"curl: ("* ]]; then
  echo "e2e: the unmeshed caller did not get to call echo: $out" >&2
  exit 1
fi
if [ "${E2E_KEEP:-}" != 1 ]; then
  kc delete namespace "$n" "$plain" --wait=false
fi
