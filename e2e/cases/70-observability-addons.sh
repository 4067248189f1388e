# Observability addons, mode Install: switching them on brings up Prometheus, Grafana and Jaeger
# owned by the Mesh and ObservabilityReady becomes True; a deleted Deployment comes back;
# Prometheus discovers the sidecars; switching them off deletes what was installed.
ns="$E2E_NAMESPACE"
kc patch mesh default --type merge -p \
  '{"spec":{"observability":{"mode":"Install","metrics":{"enabled":true},"dashboards":{"enabled":true},"tracing":{"enabled":true}}}}'
wait_for --for condition=ObservabilityReady mesh/default
for d in trellis-prometheus trellis-grafana trellis-jaeger; do
  owner="$(kc -n "$ns" get deploy "$d" -o jsonpath='{.metadata.ownerReferences[0].kind}/{.metadata.ownerReferences[0].name}')"
  [ "$owner" = Mesh/default ] || { echo "e2e: $d is owned by '$owner', not Mesh/default" >&2; exit 1; }
  grade="$(kc -n "$ns" get deploy "$d" -o jsonpath='{.metadata.labels.trellis\.dev/grade}')"
  [ "$grade" = evaluation ] || { echo "e2e: $d is not labelled trellis.dev/grade=evaluation" >&2; exit 1; }
done
# The sidecars are told to export to the installed Jaeger.
meshed=trellis-e2e-obs
kc create namespace "$meshed" --dry-run=client -o yaml | kc apply -f -
kc label namespace "$meshed" trellis.dev/inject=enabled --overwrite
wait_until "the compiled config of $meshed names the installed Jaeger" sh -c \
  "kubectl -n $meshed get configmap trellis-proxy -o jsonpath='{.data.config\.json}' 2>/dev/null | grep -q 'trellis-jaeger.$ns.svc:4317'"
# A deleted Deployment is restored by the operator.
kc -n "$ns" delete deploy trellis-grafana --wait=true
wait_until "trellis-grafana is restored" kubectl -n "$ns" get deploy trellis-grafana
wait_for --for condition=ObservabilityReady mesh/default
# Prometheus is up and has the sidecar job (asked from inside its pod: the NetworkPolicy lets
# only Grafana in; the image is busybox-based).
kc -n "$ns" exec deploy/trellis-prometheus -- wget -qO- http://127.0.0.1:9090/api/v1/targets |
  grep -q '"job":"trellis-proxies"' || { echo "e2e: Prometheus has no trellis-proxies targets" >&2; exit 1; }
# Switched off: what was installed goes away.
kc patch mesh default --type merge -p \
  '{"spec":{"observability":{"metrics":{"enabled":false},"dashboards":{"enabled":false},"tracing":{"enabled":false}}}}'
for d in trellis-prometheus trellis-grafana trellis-jaeger; do
  wait_until "$d is deleted" sh -c "! kubectl -n $ns get deploy $d >/dev/null 2>&1"
done
wait_until "the Prometheus ClusterRole is deleted" sh -c "! kubectl get clusterrole trellis-prometheus >/dev/null 2>&1"
if [ "${E2E_KEEP:-}" != 1 ]; then
  kc delete namespace "$meshed" --wait=false
fi
