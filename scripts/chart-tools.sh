#!/usr/bin/env bash
# The tools the chart's tests use, built from Go modules once and cached; prints their paths.
#   scripts/chart-tools.sh                 helm=PATH, helm-unittest=PATH and helm-plugins=DIR, one a line
#   scripts/chart-tools.sh helm            the path of helm (e2e/controlplane's cached build, or PATH's)
#   scripts/chart-tools.sh helm-unittest   the path of the helm-unittest binary
#   scripts/chart-tools.sh helm-plugins    a HELM_PLUGINS directory holding helm-unittest as the `unittest` plugin
#
# helm is e2e/controlplane/lib.sh's `cp_build helm` (the same cache the control plane uses), unless `helm` is on
# PATH and MODELHERD_BUILD_TOOLS is not 1. helm-unittest is built from its Go module (checksum-verified) into
#   ${MODELHERD_CACHE:-$HOME/.cache/modelherd}/tools/helm-unittest-$HELM_UNITTEST_VERSION/
# (bin/helm-unittest, and plugins/unittest/{plugin.yaml,untt} for `HELM_PLUGINS=... helm unittest CHART`).
# The binary runs on its own too: `helm-unittest [flags] CHART` (it renders with the Helm library it embeds).
# Fails loudly (non-zero, a reason on stderr) when Go is missing or the build fails.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
HELM_UNITTEST_VERSION="${HELM_UNITTEST_VERSION:-v1.1.2}"
HELM_UNITTEST_MODULE=github.com/helm-unittest/helm-unittest
TOOLS_CACHE="${MODELHERD_CACHE:-$HOME/.cache/modelherd}/tools"

# shellcheck source=../e2e/controlplane/lib.sh disable=SC1091
. "$ROOT/e2e/controlplane/lib.sh"

tool_helm() {
  local src=""
  if [ "${MODELHERD_BUILD_TOOLS:-0}" != 1 ]; then src="$(command -v helm 2>/dev/null || true)"; fi
  [ -n "$src" ] || src="$(cp_build helm)"
  [ -x "$src" ] || { echo "chart-tools: no helm at $src" >&2; return 1; }
  echo "$src"
}

tool_helm_unittest() {
  local dir="$TOOLS_CACHE/helm-unittest-$HELM_UNITTEST_VERSION" go
  local out="$dir/bin/helm-unittest"
  if [ ! -x "$out" ]; then
    go="$(cp_go)" || return 1
    mkdir -p "$dir"
    (
      flock 9  # one build at a time, even with parallel callers
      if [ ! -x "$out" ]; then
        echo "chart-tools: building helm-unittest $HELM_UNITTEST_VERSION from its Go module (a minute or two)..." >&2
        local t0 tmp; t0=$(date +%s); tmp="$dir/bin.tmp"
        rm -rf "$tmp"
        # Not `go install MODULE@VERSION`: the module's go.mod has a replace directive, which `go install` refuses.
        # `go mod download` fetches it checksum-verified (sum.golang.org); build it as the main module, as it is.
        local src
        src="$(cd "$dir" && "$go" mod download -json "$HELM_UNITTEST_MODULE@$HELM_UNITTEST_VERSION" \
          | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')"
        [ -n "$src" ] && [ -d "$src" ] || { echo "chart-tools: go mod download gave no source directory" >&2; exit 1; }
        (cd "$src" && CGO_ENABLED=0 GOFLAGS="-mod=readonly -buildvcs=false" "$go" build -trimpath -ldflags="-s -w" \
          -o "$tmp/helm-unittest" ./cmd/helm-unittest) >&2
        [ -x "$tmp/helm-unittest" ] || { echo "chart-tools: go install produced no $tmp/helm-unittest" >&2; exit 1; }
        mkdir -p "$dir/bin"
        mv "$tmp/helm-unittest" "$out.tmp" && mv "$out.tmp" "$out"
        rm -rf "$tmp"
        echo "chart-tools: built helm-unittest in $(( $(date +%s) - t0 ))s -> $out" >&2
      fi
    ) 9>"$dir/build.lock" || { echo "chart-tools: building helm-unittest failed" >&2; return 1; }
  fi
  echo "$out"
}

tool_helm_plugins() {
  local bin dir plugin
  bin="$(tool_helm_unittest)" || return 1
  dir="$(dirname "$(dirname "$bin")")/plugins"
  plugin="$dir/unittest"
  if [ ! -x "$plugin/untt" ] || [ ! -f "$plugin/plugin.yaml" ]; then
    mkdir -p "$plugin"
    ln -sfn "$bin" "$plugin/untt"
    # what the project's own plugin.yaml says, minus the install hooks that download a release binary
    cat >"$plugin/plugin.yaml" <<EOF
name: "unittest"
version: "${HELM_UNITTEST_VERSION#v}"
usage: "unittest for helm charts"
description: "Unit test for helm chart in YAML with ease to keep your chart functional and robust."
ignoreFlags: false
command: "\$HELM_PLUGIN_DIR/untt"
EOF
  fi
  echo "$dir"
}

case "${1:-all}" in
  helm) tool_helm ;;
  helm-unittest) tool_helm_unittest ;;
  helm-plugins) tool_helm_plugins ;;
  all)
    h="$(tool_helm)"; u="$(tool_helm_unittest)"; p="$(tool_helm_plugins)"
    printf 'helm=%s\nhelm-unittest=%s\nhelm-plugins=%s\n' "$h" "$u" "$p" ;;
  *) echo "usage: $0 [helm|helm-unittest|helm-plugins|all]" >&2; exit 2 ;;
esac
