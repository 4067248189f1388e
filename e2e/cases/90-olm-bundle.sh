# The OLM bundle, installed the way OLM installs it (without OLM itself): the CSV's Deployment,
# ServiceAccount and RBAC in a namespace other than trellis-system (e2e/lib/olm-install.py), the
# bundle's CRDs, Services and PodDisruptionBudget; then the Mesh must become Ready, with the CA
# Secret and the webhook's Service in that namespace. Runs last: it replaces the kustomize
# install (one operator owns the webhook configuration and the Mesh).
ns=trellis-olm-e2e
py="${TRELLIS_CACHE:-${HOME:-/root}/.cache/trellis}/venv/bin/python"
[ -x "$py" ] || py=python3
if ! "$py" -c 'import yaml' 2>/dev/null; then
  echo "e2e: SKIP 90-olm-bundle: PyYAML is missing; run hack/validate-manifests.sh --install"
  exit 0
fi

kc delete --ignore-not-found --wait=true mesh default
kc delete --ignore-not-found mutatingwebhookconfiguration trellis-sidecar-injector
kc -n trellis-system delete --ignore-not-found --wait=true deployment trellis-operator

kc create namespace "$ns" --dry-run=client -o yaml | kc apply -f -
kc label namespace "$ns" trellis.dev/inject=disabled --overwrite
"$py" "$E2E_ROOT/e2e/lib/olm-install.py" "$E2E_ROOT/bundle" "$ns" "${TRELLIS_OPERATOR_IMAGE:-}" |
  kc apply --server-side --force-conflicts -f -
kc -n "$ns" rollout status deploy/trellis-operator --timeout="$E2E_TIMEOUT"

kc apply -f "$E2E_ROOT/config/samples/trellis_v1alpha1_mesh.yaml"
wait_for --for condition=Ready mesh/default
kc -n "$ns" get secret trellis-ca >/dev/null
svc_ns="$(kc get mutatingwebhookconfiguration trellis-sidecar-injector \
  -o jsonpath='{.webhooks[0].clientConfig.service.namespace}')"
if [ "$svc_ns" != "$ns" ]; then
  echo "e2e: the webhook calls the operator in $svc_ns, not $ns" >&2
  exit 1
fi

if [ "${E2E_KEEP:-}" != 1 ]; then
  kc delete --ignore-not-found --wait=true mesh default
  kc delete --ignore-not-found clusterrole,clusterrolebinding -l olm.owner.namespace="$ns"
  kc delete namespace "$ns" --wait=false
fi
