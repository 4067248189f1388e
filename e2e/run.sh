#!/usr/bin/env bash
# The cluster test suite. Installs Trellis into the cluster $KUBECONFIG points at (kind, k3d, a
# real cluster), then runs every e2e/cases/*.sh in name order. Skips, with a message and exit 0,
# when there is no cluster: CI has none, users and release pipelines do.
#
#   KUBECONFIG=~/.kube/kind e2e/run.sh
#
# Environment:
#   TRELLIS_OPERATOR_IMAGE  operator image to install instead of the one in config/manager
#                           (e.g. one loaded with `kind load docker-image`)
#   E2E_TIMEOUT             how long each wait may take (default 180s)
#   E2E_KEEP=1              leave the install and test objects in place afterwards
#
# A case is a bash file in e2e/cases/ using the helpers below (kc, wait_for, expect_refused);
# it fails the suite by exiting non-zero. Later features add their own case files.
set -euo pipefail
cd "$(dirname "$0")/.."
root="$(pwd)"

skip() {
  echo "e2e: SKIP: $*"
  exit 0
}

if [ -z "${KUBECONFIG:-}" ]; then
  skip "KUBECONFIG is not set; point it at a test cluster (kind, k3d) to run the cluster suite"
fi
command -v kubectl >/dev/null 2>&1 || skip "kubectl is not installed"
if ! kubectl version --request-timeout=5s >/dev/null 2>&1; then
  skip "no cluster answers at KUBECONFIG=$KUBECONFIG"
fi

export E2E_TIMEOUT="${E2E_TIMEOUT:-180s}"
kc() { kubectl --request-timeout=30s "$@"; }
# wait_for <kubectl wait args...>: waits up to E2E_TIMEOUT.
wait_for() { kubectl wait --timeout="$E2E_TIMEOUT" "$@"; }
# expect_refused <file> <message>: the API server must refuse the object with that message.
expect_refused() {
  local out
  if out="$(kubectl apply --dry-run=server -f "$1" 2>&1)"; then
    echo "e2e: $1 was admitted but must be refused ($2)" >&2
    return 1
  fi
  if ! grep -qF "$2" <<<"$out"; then
    echo "e2e: $1 was refused for another reason than \"$2\": $out" >&2
    return 1
  fi
}
export -f kc wait_for expect_refused

work="$(mktemp -d)"
cleanup() {
  if [ "${E2E_KEEP:-}" != 1 ]; then
    kubectl delete --ignore-not-found --wait=false mesh default >/dev/null 2>&1 || true
    kubectl delete --ignore-not-found --wait=false -k "$install" >/dev/null 2>&1 || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT

# The install under test: config/default, with the operator image swapped if asked.
install="$root/config/default"
if [ -n "${TRELLIS_OPERATOR_IMAGE:-}" ]; then
  install="$work/install"
  mkdir -p "$install"
  cat >"$install/kustomization.yaml" <<YAML
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
  - $root/config/default
images:
  - name: ghcr.io/trellis-mesh/trellis-operator
    newName: ${TRELLIS_OPERATOR_IMAGE%:*}
    newTag: ${TRELLIS_OPERATOR_IMAGE##*:}
YAML
fi
export E2E_INSTALL="$install" E2E_WORK="$work" E2E_ROOT="$root"

echo "e2e: installing (kubectl apply -k ${install#"$root/"})"
kc apply -k "$install"
wait_for --for condition=established crd/meshes.trellis.dev crd/trafficpolicies.trellis.dev crd/peerauthentications.trellis.dev
kc -n trellis-system rollout status deploy/trellis-operator --timeout="$E2E_TIMEOUT"

failed=0
for case in e2e/cases/*.sh; do
  echo "e2e: --- ${case#e2e/cases/}"
  if bash -euo pipefail "$case"; then
    echo "e2e: ok ${case#e2e/cases/}"
  else
    echo "e2e: FAILED ${case#e2e/cases/}"
    failed=1
  fi
done
[ "$failed" = 0 ] && echo "e2e: all cases passed"
exit "$failed"
