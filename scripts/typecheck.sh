#!/usr/bin/env bash
# mypy over the package as it is installed (modelherd.storage, .coordination, .agent), so that
# imports across layers resolve: a tree of symlinks gives mypy the installed names.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
tree=build/typecheck/modelherd
mkdir -p "$tree"
for d in storage coordination agent testing; do ln -sfn "../../../$d" "$tree/$d"; done
cd build/typecheck
exec ../../.venv/bin/mypy --config-file ../../pyproject.toml modelherd/storage modelherd/coordination modelherd/agent modelherd/testing
