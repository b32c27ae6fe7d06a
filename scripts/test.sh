#!/usr/bin/env bash
# Install everything the tests need from scratch, then lint, type-check and test.
#   bash scripts/test.sh [pytest args...]
# Idempotent: reuses .venv and the Go build cache; fails loudly on the first error.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PY="${PYTHON:-python3}"
T0=$(date +%s)
PHASE_T=$T0
step() {
  local now; now=$(date +%s)
  [ -z "${PHASE:-}" ] || printf '=== %s took %ss\n' "$PHASE" "$(( now - PHASE_T ))" >&2
  PHASE="$*"; PHASE_T=$now
  printf '\n=== %s (t=%ss)\n' "$*" "$(( now - T0 ))" >&2
}

step "python venv + modelherd[dev]"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# uv resolves and installs in parallel (16 s here where pip takes 155 s); pip is the fallback where uv cannot run
if .venv/bin/python -m pip install -q --disable-pip-version-check uv \
    && .venv/bin/uv pip install -q --python .venv/bin/python -e '.[dev]'; then
  :
else
  echo "uv failed; installing with pip" >&2
  .venv/bin/python -m pip install -q --disable-pip-version-check -U pip
  .venv/bin/python -m pip install -q --disable-pip-version-check -e '.[dev]'
fi

step "Debian packages the tests use (promtool/prometheus, docker-registry, htpasswd)"
# docker-registry (CNCF distribution) and htpasswd (apache2-utils): the registry source's real-registry tests start
# it themselves on 127.0.0.1 (tests/registry_fixtures.py); its packaged daemon is never started (policy-rc.d)
if ! command -v promtool >/dev/null 2>&1 || ! command -v prometheus >/dev/null 2>&1 \
    || ! command -v docker-registry >/dev/null 2>&1 || ! command -v htpasswd >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    # never let the package start its daemon (it would listen on every interface): policy-rc.d says no
    created_policy=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; created_policy=1; fi
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends prometheus docker-registry apache2-utils >/dev/null
    [ "$created_policy" = 0 ] || rm -f /usr/sbin/policy-rc.d
  else
    echo "promtool/prometheus/docker-registry/htpasswd missing: install Debian's 'prometheus', 'docker-registry'" \
      "and 'apache2-utils' packages (needs root and apt-get)" >&2
    exit 1
  fi
fi
promtool --version 2>&1 | head -1 >&2

step "control plane for integration tests (kube-apiserver + etcd from Go modules; cached)"
if ! command -v go >/dev/null 2>&1 && [ -x /usr/local/go/bin/go ]; then export PATH="/usr/local/go/bin:$PATH"; fi
start=$(date +%s)
e2e/controlplane/build up >/dev/null
echo "control plane build/cache check: $(( $(date +%s) - start ))s" >&2

step "chart tools: helm + helm-unittest (from Go modules; cached)"
start=$(date +%s)
bash scripts/chart-tools.sh >&2
echo "chart tools build/cache check: $(( $(date +%s) - start ))s" >&2

step "oras CLI for the registry tests (from its Go module; cached)"
ORAS="$(bash scripts/oras.sh)"
"$ORAS" version 2>&1 | head -1 >&2

step "alert rules rendered from the chart's files/alerts.yaml are up to date"
.venv/bin/python monitoring/render_rules.py --check

step "ruff"
.venv/bin/ruff check .
step "mypy"
bash scripts/typecheck.sh

step "pytest"
set +e
.venv/bin/python -m pytest "$@"
rc=$?
set -e
step "done"
echo "total: $(( $(date +%s) - T0 ))s" >&2
exit $rc
