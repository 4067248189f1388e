# The install follows its namespace (E2E_NAMESPACE; hack/kind.sh installs into mesh-ops): the CA
# Secret lives there, the webhook configuration calls the Service there and is owned by the
# Mesh, and nothing was created in trellis-system.
ns="$E2E_NAMESPACE"
hook=mutatingwebhookconfiguration/trellis-sidecar-injector
wait_until "the CA Secret exists in $ns" kc -n "$ns" get secret trellis-ca -o name
wait_until "the webhook configuration exists" kc get "$hook" -o name
for i in 0 1; do
  svc="$(kc get "$hook" -o jsonpath="{.webhooks[$i].clientConfig.service.namespace}/{.webhooks[$i].clientConfig.service.name}")"
  if [ "$svc" != "$ns/trellis-operator" ]; then
    echo "e2e: webhook $i calls $svc, not $ns/trellis-operator" >&2
    exit 1
  fi
done
owner="$(kc get "$hook" -o jsonpath='{.metadata.ownerReferences[0].kind}/{.metadata.ownerReferences[0].name}')"
if [ "$owner" != Mesh/default ]; then
  echo "e2e: the webhook configuration is owned by '$owner', not Mesh/default" >&2
  exit 1
fi
if [ "$ns" != trellis-system ] && kc get namespace trellis-system >/dev/null 2>&1 &&
  kc -n trellis-system get secret trellis-ca >/dev/null 2>&1; then
  echo "e2e: installed into $ns, but a CA Secret appeared in trellis-system" >&2
  exit 1
fi
