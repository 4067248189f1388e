# A probed port stays meshed: under Strict mTLS the app's readiness and liveness probes on its
# only port reach it through the proxy (rewritten to :15020/app-health/...), the pod becomes
# Ready, the port is not excluded from the redirect, and an unmeshed caller is still refused.
n=trellis-e2e-probe
plain=trellis-e2e-probe-plain
for ns in "$n" "$plain"; do
  kc create namespace "$ns" --dry-run=client -o yaml | kc apply -f -
done
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
apiVersion: apps/v1
kind: Deployment
metadata: {name: probed, namespace: $n}
spec:
  selector: {matchLabels: {app: probed}}
  template:
    metadata: {labels: {app: probed}}
    spec:
      containers:
        - name: app
          image: registry.k8s.io/e2e-test-images/agnhost:2.53
          args: [netexec, --http-port=8080]
          ports: [{name: http, containerPort: 8080}]
          readinessProbe:
            httpGet: {path: /hostname, port: http}
            periodSeconds: 2
          livenessProbe:
            tcpSocket: {port: 8080}
            periodSeconds: 5
---
apiVersion: v1
kind: Service
metadata: {name: probed, namespace: $n}
spec:
  selector: {app: probed}
  ports: [{name: http, port: 80, targetPort: 8080}]
YAML
# Ready under Strict: the kubelet's probe went through the proxy's admin port.
kc -n "$n" rollout status deploy/probed --timeout="$E2E_TIMEOUT"
pod="$(kc -n "$n" get pod -l app=probed -o jsonpath='{.items[0].metadata.name}')"
port="$(kc -n "$n" get pod "$pod" -o jsonpath='{.spec.containers[0].readinessProbe.httpGet.port}')"
if [ "$port" != 15020 ]; then
  echo "e2e: the readiness probe was not rewritten to the proxy's admin port (port $port)" >&2
  exit 1
fi
init_args="$(kc -n "$n" get pod "$pod" -o jsonpath='{.spec.initContainers[?(@.name=="trellis-init")].args}')"
if [[ "$init_args" == *8080* ]]; then
  echo "e2e: the probed port 8080 is excluded from the mesh: $init_args" >&2
  exit 1
fi
if out="$(kubectl -n "$plain" run plain-caller --image=curlimages/curl:8.11.1 --restart=Never \
  --rm -i --pod-running-timeout="$E2E_TIMEOUT" \
  --command -- curl -fsS --max-time 5 "http://probed.$n/hostname" 2>&1)"; then
  echo "e2e: an unmeshed caller reached the probed port under Strict mTLS: $out" >&2
  exit 1
fi
if [[ "$out" != *"curl: ("* ]]; then
  echo "e2e: the unmeshed caller did not get to call the probed port: $out" >&2
  exit 1
fi
if [ "${E2E_KEEP:-}" != 1 ]; then
  kc delete namespace "$n" "$plain" --wait=false
fi
