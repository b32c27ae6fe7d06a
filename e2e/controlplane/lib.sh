# shellcheck shell=bash
# Shared helpers for up/build. Sourced, not executed.
# Cache layout: ${MODELHERD_CACHE:-$HOME/.cache/modelherd}/controlplane/<hash>/{controlplane,kubectl,helm}
# where <hash> covers go.mod, go.sum and the Go sources.

CP_HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CP_CACHE="${MODELHERD_CACHE:-$HOME/.cache/modelherd}/controlplane"

cp_go() {
  if command -v go >/dev/null 2>&1; then command -v go
  elif [ -x /usr/local/go/bin/go ]; then echo /usr/local/go/bin/go
  else
    echo "controlplane: Go is not installed (need go >= 1.24 on PATH or /usr/local/go/bin/go)" >&2
    return 1
  fi
}

cp_hash() {
  (cd "$CP_HERE" && cat go.mod go.sum ./*.go lib.sh | sha256sum | cut -c1-16)
}

# Stamp the versions from go.mod into the binaries (like Kubernetes' own build does), so
# /version reports v1.34.x rather than v0.0.0-master (kubectl/helm parse it).
cp_version_ldflags() {
  local go="$1" kv hv major minor pkg
  kv="$(cd "$CP_HERE" && GOFLAGS=-mod=mod "$go" list -m -f '{{.Version}}' k8s.io/kubernetes)"
  hv="$(cd "$CP_HERE" && GOFLAGS=-mod=mod "$go" list -m -f '{{.Version}}' helm.sh/helm/v3)"
  major="${kv#v}"; major="${major%%.*}"
  minor="${kv#v*.}"; minor="${minor%%.*}"
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    printf -- '-X %s.gitVersion=%s -X %s.gitMajor=%s -X %s.gitMinor=%s -X %s.gitTreeState=clean ' \
      "$pkg" "$kv" "$pkg" "$major" "$pkg" "$minor" "$pkg"
  done
  printf -- '-X helm.sh/helm/v3/internal/version.version=%s' "$hv"
}

# cp_build NAME -> prints the path of the cached binary, building it if missing.
# NAME: controlplane | kubectl | helm
cp_build() {
  local name="$1" pkg out go lock
  case "$name" in
    controlplane) pkg=. ;;
    kubectl) pkg=k8s.io/kubernetes/cmd/kubectl ;;
    helm) pkg=helm.sh/helm/v3/cmd/helm ;;
    *) echo "cp_build: unknown $name" >&2; return 1 ;;
  esac
  out="$CP_CACHE/$(cp_hash)/$name"
  if [ ! -x "$out" ]; then
    go="$(cp_go)" || return 1
    mkdir -p "$(dirname "$out")"
    lock="$out.lock"
    (
      # One build at a time per binary, even with parallel `up`s.
      flock 9
      if [ ! -x "$out" ]; then
        echo "controlplane: building $name (first build downloads modules and compiles; several minutes on 2 cores)..." >&2
        local t0; t0=$(date +%s)
        (cd "$CP_HERE" && CGO_ENABLED=0 GOFLAGS=-mod=mod "$go" build -trimpath \
          -ldflags="-s -w $(cp_version_ldflags "$go")" -o "$out.tmp" "$pkg") >&2
        mv "$out.tmp" "$out"
        echo "controlplane: built $name in $(( $(date +%s) - t0 ))s -> $out" >&2
      fi
    ) 9>"$lock" || return 1
  fi
  echo "$out"
}

# cp_tools BINDIR: kubectl and helm in BINDIR (symlinks): from PATH when present,
# else built from Go modules into the cache.
cp_tools() {
  local bindir="$1" t src
  mkdir -p "$bindir"
  for t in kubectl helm; do
    src=""
    if [ "${MODELHERD_BUILD_TOOLS:-0}" != 1 ]; then
      src="$(PATH="${PATH//$bindir:/}" command -v "$t" 2>/dev/null || true)"
      # never link to ourselves
      case "$src" in "$bindir"/*) src="" ;; esac
    fi
    [ -n "$src" ] || src="$(cp_build "$t")" || return 1
    ln -sfn "$src" "$bindir/$t"
  done
}
