#!/usr/bin/env bash
# Installs the system packages the test suite needs on a fresh Debian machine (CI runs as root).
# Idempotent: skips what is already there. Add a package here when a test needs it, with why.
set -euo pipefail

need=()
# iptables + iproute2: the root-only data-plane tests build network namespaces and install
# the real redirect rules.
command -v iptables-restore >/dev/null 2>&1 || need+=(iptables)
command -v ip >/dev/null 2>&1 || need+=(iproute2)
# The shell linter: hack/test.sh checks every shell script (hack/, e2e/) with it.
command -v shellcheck >/dev/null 2>&1 || need+=(shellcheck)
# chromium: hack/dev-e2e.sh checks the dashboard's DOM and takes its screenshot headless.
# curl: the same script waits on the dashboard's /api/graph.
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v curl >/dev/null 2>&1 || need+=(curl)
# python3: sidecar/tests/conformance.rs runs its standard-library HTTP server as the application
# behind a sidecar pair (curl is that test's client); hack/validate-manifests.sh needs it too.
command -v python3 >/dev/null 2>&1 || need+=(python3)
# prometheus: the same script runs a real one against `trellis dev` for `trellis stat` and the
# dashboard/alert queries, and its promtool checks and unit-tests the alert rules.
command -v prometheus >/dev/null 2>&1 || need+=(prometheus)

if [ "${#need[@]}" -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "install-deps: need root to install: ${need[*]}" >&2
    exit 1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}"
fi

# kubernetes-validate (and kubectl where the machine has none) for the manifest tests, in a
# virtualenv under ~/.cache/trellis: see hack/validate-manifests.sh.
bash "$(dirname "$0")/validate-manifests.sh" --install
