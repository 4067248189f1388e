# The CRDs' validation rules hold on a real API server, not only in the offline CEL tests.
cat >"$E2E_WORK/mesh-prod.yaml" <<'YAML'
apiVersion: trellis.dev/v1alpha1
kind: Mesh
metadata:
  name: prod
spec: {}
YAML
expect_refused "$E2E_WORK/mesh-prod.yaml" "rename this object to default"

cat >"$E2E_WORK/tp-attempts.yaml" <<'YAML'
apiVersion: trellis.dev/v1alpha1
kind: TrafficPolicy
metadata:
  name: e2e-invalid
  namespace: default
spec:
  targetRef:
    name: kubernetes
  retries:
    attempts: 11
YAML
expect_refused "$E2E_WORK/tp-attempts.yaml" "attempts must be 1 to 10"

cat >"$E2E_WORK/pa-ports.yaml" <<'YAML'
apiVersion: trellis.dev/v1alpha1
kind: PeerAuthentication
metadata:
  name: e2e-invalid
  namespace: default
spec:
  portLevelMtls:
    "8080":
      mode: Disable
YAML
expect_refused "$E2E_WORK/pa-ports.yaml" "portLevelMtls needs a selector"
