#!/usr/bin/env bash
# The oras CLI the registry tests push with (tests/registry_fixtures.py, e2e/test_registry.py): built once from its Go
# module (checksum-verified through sum.golang.org) into ${MODELHERD_CACHE:-~/.cache/modelherd}/tools/oras-VERSION/bin;
# prints the binary's path. Used by scripts/test.sh and e2e/run.
set -euo pipefail
ORAS_VERSION=v1.3.6  # tests/registry_fixtures.py looks for this one
ORAS_DIR="${MODELHERD_CACHE:-$HOME/.cache/modelherd}/tools/oras-$ORAS_VERSION"
if [ ! -x "$ORAS_DIR/bin/oras" ]; then
  start=$(date +%s)
  mkdir -p "$ORAS_DIR"
  (
    flock 9  # one build at a time, even with parallel callers
    if [ ! -x "$ORAS_DIR/bin/oras" ]; then
      go="$(command -v go || echo /usr/local/go/bin/go)"
      # go install MODULE@VERSION: built into a temporary GOBIN, then moved
      rm -rf "$ORAS_DIR/bin.tmp"
      GOBIN="$ORAS_DIR/bin.tmp" CGO_ENABLED=0 GOFLAGS=-buildvcs=false \
        "$go" install -trimpath -ldflags="-s -w" "oras.land/oras/cmd/oras@$ORAS_VERSION" >&2
      mkdir -p "$ORAS_DIR/bin" && mv "$ORAS_DIR/bin.tmp/oras" "$ORAS_DIR/bin/oras" && rm -rf "$ORAS_DIR/bin.tmp"
    fi
  ) 9>"$ORAS_DIR/build.lock"
  echo "oras build: $(( $(date +%s) - start ))s" >&2
fi
echo "$ORAS_DIR/bin/oras"
