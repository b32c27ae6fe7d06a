#!/usr/bin/env bash
# Install everything the tests need from scratch, then lint, type-check and test.
#   bash scripts/test.sh [pytest args...]
# Idempotent: reuses .venv and the Go build cache; fails loudly on the first error.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PY="${PYTHON:-python3}"
step() { printf '\n=== %s\n' "$*" >&2; }

step "python venv + modelherd[dev]"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -U pip
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[dev]'

step "control plane for integration tests (kube-apiserver + etcd from Go modules; cached)"
if ! command -v go >/dev/null 2>&1 && [ -x /usr/local/go/bin/go ]; then export PATH="/usr/local/go/bin:$PATH"; fi
start=$(date +%s)
e2e/controlplane/build up >/dev/null
echo "control plane build/cache check: $(( $(date +%s) - start ))s" >&2

step "ruff"
.venv/bin/ruff check .
step "mypy"
bash scripts/typecheck.sh

step "pytest"
exec .venv/bin/python -m pytest "$@"
