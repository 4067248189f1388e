#!/usr/bin/env bash
# Trellis from this checkout on a kind cluster: builds both images (Dockerfile targets operator
# and proxy), loads them into the cluster (created if missing), then runs the cluster suite
# (e2e/run.sh), which installs them and runs every e2e/cases/*.sh; the last case uninstalls.
#
#   hack/kind.sh
#
# Environment:
#   KIND_CLUSTER    cluster name (default trellis)
#   TAG             image tag (default dev): trellis-operator:$TAG, trellis-proxy:$TAG
#   E2E_NAMESPACE   where to install (default mesh-ops: a non-default namespace, so every run
#                   checks that nothing depends on trellis-system)
#   KEEP_CLUSTER=1  keep a cluster this script created (default: delete it at the end)
# Needs docker, kind and kubectl; exits non-zero naming what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

for tool in docker kind kubectl; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    echo "kind.sh: $tool is required (and not on PATH)" >&2
    exit 1
  fi
done

cluster="${KIND_CLUSTER:-trellis}"
tag="${TAG:-dev}"
operator="trellis-operator:$tag"
proxy="trellis-proxy:$tag"

echo "kind.sh: building $operator and $proxy"
docker build --target operator -t "$operator" .
docker build --target proxy -t "$proxy" .

created=0
if ! kind get clusters 2>/dev/null | grep -qx "$cluster"; then
  kind create cluster --name "$cluster" --wait 180s
  created=1
fi
kubeconfig="$(mktemp)"
cleanup() {
  rm -f "$kubeconfig"
  if [ "$created" = 1 ] && [ "${KEEP_CLUSTER:-}" != 1 ]; then
    kind delete cluster --name "$cluster"
  fi
}
trap cleanup EXIT
kind get kubeconfig --name "$cluster" >"$kubeconfig"

echo "kind.sh: loading the images into $cluster"
kind load docker-image --name "$cluster" "$operator" "$proxy"

KUBECONFIG="$kubeconfig" \
  TRELLIS_OPERATOR_IMAGE="$operator" \
  TRELLIS_PROXY_IMAGE="$proxy" \
  E2E_NAMESPACE="${E2E_NAMESPACE:-mesh-ops}" \
  bash e2e/run.sh
