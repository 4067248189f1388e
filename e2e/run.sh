#!/usr/bin/env bash
# The cluster test suite. Installs Trellis into the cluster $KUBECONFIG points at (kind, k3d, a
# real cluster), then runs every e2e/cases/*.sh in name order. Skips, with a message and exit 0,
# when there is no cluster: CI has none, users and release pipelines do.
#
#   KUBECONFIG=~/.kube/kind e2e/run.sh
#
# Environment:
#   TRELLIS_OPERATOR_IMAGE  operator image to install instead of the one in config/manager
#                           (e.g. one loaded with `kind load docker-image`; hack/kind.sh does it)
#   TRELLIS_PROXY_IMAGE     sidecar image the Mesh injects instead of the sample's
#   E2E_NAMESPACE           namespace to install into (default trellis-system; any other one
#                           goes through a kustomize `namespace:` overlay, as an OLM or
#                           platform install would)
#   E2E_TIMEOUT             how long each wait may take (default 180s)
#   E2E_KEEP=1              leave the install and test objects in place afterwards
#
# A case is a bash file in e2e/cases/ using the helpers below (kc, wait_for, expect_refused,
# apply_mesh, wait_until); it fails the suite by exiting non-zero. Cases run in name order; the
# last one (99-uninstall.sh) removes the install.
# The helpers (and the cleanup trap) are called by the cases and on exit, which shellcheck
# cannot follow: it would call them unreachable.
# shellcheck disable=SC2317
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
export E2E_NAMESPACE="${E2E_NAMESPACE:-trellis-system}"
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
# apply_mesh: the sample Mesh, with the sidecar image under test.
apply_mesh() {
  local image="${TRELLIS_PROXY_IMAGE:-}"
  if [ -n "$image" ]; then
    # The sample leaves the image commented out (the operator's default): set it.
    sed -e "s|\(# \)\{0,1\}image: ghcr.io/trellis-mesh/trellis-proxy:.*|image: $image|" \
      "$E2E_ROOT/config/samples/trellis_v1alpha1_mesh.yaml" | kc apply -f -
  else
    kc apply -f "$E2E_ROOT/config/samples/trellis_v1alpha1_mesh.yaml"
  fi
}
# wait_until <what> <command...>: runs the command every 2 s until it succeeds, for up to
# E2E_TIMEOUT; fails naming <what>.
wait_until() {
  local what="$1" deadline=$((SECONDS + ${E2E_TIMEOUT%s}))
  shift
  until "$@"; do
    if [ "$SECONDS" -ge "$deadline" ]; then
      echo "e2e: timed out waiting until $what" >&2
      return 1
    fi
    sleep 2
  done
}
export -f kc wait_for expect_refused apply_mesh wait_until

work="$(mktemp -d)"
cleanup() {
  if [ "${E2E_KEEP:-}" != 1 ]; then
    kubectl delete --ignore-not-found --wait=false mesh default >/dev/null 2>&1 || true
    kubectl delete --ignore-not-found --wait=false -k "$install" >/dev/null 2>&1 || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT

# The install under test: config/default, in another namespace and with the operator image
# swapped if asked. kustomize takes bases by relative path only.
install="$root/config/default"
if [ -n "${TRELLIS_OPERATOR_IMAGE:-}" ] || [ "$E2E_NAMESPACE" != trellis-system ]; then
  install="$work/install"
  mkdir -p "$install"
  base="$(realpath --relative-to="$install" "$root/config/default")"
  {
    echo "apiVersion: kustomize.config.k8s.io/v1beta1"
    echo "kind: Kustomization"
    echo "namespace: $E2E_NAMESPACE"
    echo "resources:"
    echo "  - $base"
    if [ -n "${TRELLIS_OPERATOR_IMAGE:-}" ]; then
      echo "images:"
      echo "  - name: ghcr.io/trellis-mesh/trellis-operator"
      echo "    newName: ${TRELLIS_OPERATOR_IMAGE%:*}"
      echo "    newTag: ${TRELLIS_OPERATOR_IMAGE##*:}"
    fi
  } >"$install/kustomization.yaml"
fi
export E2E_INSTALL="$install" E2E_WORK="$work" E2E_ROOT="$root"

echo "e2e: installing (kubectl apply -k ${install#"$root/"})"
kc apply -k "$install"
wait_for --for condition=established crd/meshes.trellis.dev crd/trafficpolicies.trellis.dev crd/peerauthentications.trellis.dev
kc -n "$E2E_NAMESPACE" rollout status deploy/trellis-operator --timeout="$E2E_TIMEOUT"

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
