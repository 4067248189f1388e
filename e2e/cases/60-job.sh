# A Job with a sidecar completes: the proxy is a native sidecar (an init container with
# restartPolicy Always), which the kubelet stops once the Job's container has exited.
n=trellis-e2e-job
kc create namespace "$n" --dry-run=client -o yaml | kc apply -f -
kc label namespace "$n" trellis.dev/inject=enabled pod-security.kubernetes.io/enforce=privileged --overwrite
cat <<YAML | kc apply -f -
apiVersion: batch/v1
kind: Job
metadata: {name: once, namespace: $n}
spec:
  backoffLimit: 0
  template:
    spec:
      restartPolicy: Never
      containers:
        - name: work
          image: busybox:1.37
          command: [sh, -c, "echo done"]
YAML
wait_for -n "$n" --for=condition=complete job/once
sidecar="$(kc -n "$n" get pod -l job-name=once -o jsonpath='{.items[0].spec.initContainers[?(@.name=="trellis-proxy")].restartPolicy}')"
if [ "$sidecar" != Always ]; then
  echo "e2e: the Job's pod has no native trellis-proxy sidecar" >&2
  exit 1
fi
if [ "${E2E_KEEP:-}" != 1 ]; then
  kc delete namespace "$n" --wait=false
fi
