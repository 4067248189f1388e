# Uninstall with the Mesh still in place (`kubectl delete -k` first, the order that used to
# leave a failurePolicy: Fail webhook aimed at a deleted Service): the CRDs go, the Mesh with
# them, the garbage collector removes the webhook configuration the Mesh owns, and pods can be
# created again in a namespace that was meshed. Runs last: it removes the install.
if [ "${E2E_KEEP:-}" = 1 ]; then
  echo "e2e: E2E_KEEP=1: not uninstalling"
  exit 0
fi
n=trellis-e2e-after
kc create namespace "$n" --dry-run=client -o yaml | kc apply -f -
kc label namespace "$n" trellis.dev/inject=enabled --overwrite
kc get mesh default -o name
kc delete -k "$E2E_INSTALL" --ignore-not-found --wait=true --timeout="$E2E_TIMEOUT"
gone() { ! kubectl get mutatingwebhookconfiguration trellis-sidecar-injector >/dev/null 2>&1; }
wait_until "the webhook configuration is gone" gone
kc -n "$n" run after-uninstall --image=registry.k8s.io/pause:3.10 --restart=Never
injected="$(kc -n "$n" get pod after-uninstall -o jsonpath='{.spec.initContainers[*].name}')"
if [ -n "$injected" ]; then
  echo "e2e: a pod created after the uninstall was injected ($injected)" >&2
  exit 1
fi
kc delete namespace "$n" --wait=false
