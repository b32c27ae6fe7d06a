# shellcheck shell=bash
# Shared helpers for e2e/cluster/{up,down,image}. Sourced, not executed.
# Cache: ${MODELHERD_CACHE:-$HOME/.cache/modelherd}/cluster/
#   kube-<hash>/{kubelet,kube-controller-manager,kube-scheduler}  hash: controlplane go.mod + go.sum + CL_KUBE_RECIPE
#   base-<hash>/layer.tar     debootstrap rootfs with python3 (hash: CL_BASE_RECIPE)
#   deps-<hash>/layer.tar     the agent's Python dependencies (hash: pyproject.toml + base hash)
#   pause-<hash>.tar, busybox-<hash>.tar   tiny images (hash: their recipe)

CL_HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CL_ROOT="$(cd "$CL_HERE/../.." && pwd)"
CL_CACHE="${MODELHERD_CACHE:-$HOME/.cache/modelherd}/cluster"
# shellcheck source=../controlplane/lib.sh disable=SC1091
. "$CL_HERE/../controlplane/lib.sh"

CL_KUBE_RECIPE="kubelet kube-controller-manager kube-scheduler from k8s.io/kubernetes/cmd, CGO_ENABLED=0 -trimpath v1"
CL_BASE_RECIPE="debootstrap --variant=minbase --include=python3 bookworm http://deb.debian.org/debian; strip doc/man/locale v1"
CL_APT_PACKAGES="containerd runc containernetworking-plugins socat debootstrap busybox-static sshfs openssh-server openssh-client iptables iproute2 fuse3 gcc libc6-dev util-linux docker-registry"
# the sandbox (pause) and busybox images (README.md, "Images")
CL_PAUSE_IMAGE="localhost/modelherd-e2e/pause:1"
CL_BUSYBOX_IMAGE="localhost/modelherd-e2e/busybox:1"

cl_log() { echo "cluster: $*" >&2; }
cl_die() { echo "cluster: $*" >&2; exit 1; }
cl_hash() { sha256sum | cut -c1-16; }

cl_kube_hash() { (cd "$CL_HERE/../controlplane" && { cat go.mod go.sum; echo "$CL_KUBE_RECIPE"; } | cl_hash); }

# cl_build_kube -> prints the cache folder holding kubelet, kube-controller-manager, kube-scheduler; builds once.
cl_build_kube() {
  local out go t0
  out="$CL_CACHE/kube-$(cl_kube_hash)"
  mkdir -p "$CL_CACHE"
  (
    flock 9
    if [ ! -x "$out/kube-scheduler" ]; then
      go="$(cp_go)" || exit 1
      cl_log "building kubelet, kube-controller-manager, kube-scheduler (cold: ~6-10 min on 2 cores)..."
      t0=$(date +%s)
      rm -rf "$out.tmp"; mkdir -p "$out.tmp"
      (cd "$CL_HERE/../controlplane" && CGO_ENABLED=0 GOFLAGS=-mod=mod "$go" build -trimpath \
        -ldflags="-s -w $(cp_version_ldflags "$go")" -o "$out.tmp/" k8s.io/kubernetes/cmd/kubelet \
        k8s.io/kubernetes/cmd/kube-controller-manager k8s.io/kubernetes/cmd/kube-scheduler) >&2 || exit 1
      rm -rf "$out"; mv "$out.tmp" "$out"
      cl_log "built kube binaries in $(( $(date +%s) - t0 ))s -> $out"
    fi
  ) 9>"$CL_CACHE/kube.lock" || return 1
  echo "$out"
}

# cl_need_root_and_kernel: the checks that make `up` fail with a clear message instead of half-starting.
cl_preflight() {
  [ "$(id -u)" = 0 ] || cl_die "must run as root (network namespaces, mounts, cgroups); try: sudo $0 $*"
  grep -qw overlay /proc/filesystems || modprobe overlay 2>/dev/null || \
    cl_die "the kernel has no overlayfs (containerd's snapshotter needs it); use e2e/kind instead"
  [ -d /sys/fs/cgroup/memory ] || [ -f /sys/fs/cgroup/cgroup.controllers ] || cl_die "no cgroup filesystem at /sys/fs/cgroup"
  [ -c /dev/fuse ] || cl_die "/dev/fuse is missing: --storage shared needs FUSE (sshfs); use --storage local"
}

# cl_apt: install the Debian packages `up` needs; never let a package start its daemon.
cl_apt() {
  local missing=() p
  for p in $CL_APT_PACKAGES; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  command -v apt-get >/dev/null || cl_die "missing packages ${missing[*]} and no apt-get: install them by hand"
  cl_log "apt-get install ${missing[*]}"
  local created=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; created=1; fi
  export DEBIAN_FRONTEND=noninteractive
  { apt-get update -qq >/dev/null && apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; } || {
    [ "$created" = 0 ] || rm -f /usr/sbin/policy-rc.d
    cl_die "apt-get install ${missing[*]} failed (no network to the Debian mirror?)"; }
  [ "$created" = 0 ] || rm -f /usr/sbin/policy-rc.d
}

# kill_pidfile FILE [SIG]: kill the process whose id FILE holds (never by name), wait up to 10 s, then SIGKILL.
# cl_kill_pidfiles SIG FILE...: signal every pid at once, wait (10 s in all) for them together, SIGKILL the rest;
# the pid files are removed. One wait for all, not one per process: `down` stays fast with many nodes.
cl_kill_pidfiles() {
  local sig="$1" f pid pids=() alive; shift
  for f in "$@"; do
    [ -f "$f" ] || continue
    pid="$(cat "$f")"; rm -f "$f"
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && { kill "-$sig" "$pid" 2>/dev/null || true; pids+=("$pid"); }
  done
  [ ${#pids[@]} -gt 0 ] || return 0
  for _ in $(seq 1 100); do
    alive=0; for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    [ "$alive" = 1 ] || return 0
    sleep 0.1
  done
  for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
  for _ in $(seq 1 50); do
    alive=0; for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    [ "$alive" = 1 ] || return 0
    sleep 0.1
  done
}

cl_kill_pidfile() {
  local f="$1" sig="${2:-TERM}" pid
  [ -f "$f" ] || return 0
  pid="$(cat "$f")"
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    kill "-$sig" "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  fi
  rm -f "$f"
}
