#!/usr/bin/env bash
# One node, run by `up` as: setsid nsenter --net=/run/netns/NS unshare --mount --uts --propagation slave node.sh NODEDIR
# (its own network, mount and UTS namespaces). Reads NODEDIR/node.env. In order: hostname; the models root
# (sshfs of the shared export, or a bind of the node's private folder), and always a private LOCAL_ROOT; containerd; image imports; the relays of
# the Hub and the registry on this node's loopback; then exec the kubelet (so the pid `up` recorded is the kubelet's).
set -euo pipefail
D="$1"
# shellcheck disable=SC1091
. "$D/node.env"
hostname "$NODE_NAME"
# as on a systemd host, every mount is shared (within this node's namespace; its master stays the host's), so
# a pod's hostPath with mountPropagation HostToContainer sees mounts made here, e.g. a late sshfs reconnect
mount --make-rshared /
mkdir -p "$MODELS_ROOT"
if [ "$STORAGE" = shared ]; then
  sshfs -f -o "port=$SSH_PORT,IdentityFile=$SSH_KEY,StrictHostKeyChecking=no,UserKnownHostsFile=/dev/null" \
    -o "allow_other,reconnect,ServerAliveInterval=5,cache=no" \
    "root@$HOST_IP:$SHARED_EXPORT" "$MODELS_ROOT" >"$D/sshfs.log" 2>&1 &
  echo $! > "$D/sshfs.pid"
  mounted() { findmnt -n -t fuse.sshfs --mountpoint "$MODELS_ROOT" >/dev/null; }
  for _ in $(seq 1 150); do mounted && break; sleep 0.1; done
  mounted || { echo "sshfs mount failed"; cat "$D/sshfs.log"; exit 1; }
else
  mkdir -p "$D/models"
  mount --bind "$D/models" "$MODELS_ROOT"
fi
# a private folder per node at LOCAL_ROOT (this mount namespace only): node-local storage next to the shared one
mkdir -p "$D/local-models" "$LOCAL_ROOT"
mount --bind "$D/local-models" "$LOCAL_ROOT"
containerd --config "$D/containerd.toml" >"$D/containerd.log" 2>&1 &
echo $! > "$D/containerd.pid"
for _ in $(seq 1 200); do [ -S "$D/containerd.sock" ] && ctr -a "$D/containerd.sock" version >/dev/null 2>&1 && break; sleep 0.1; done
for img in "$IMAGES"/*.tar; do
  ctr -a "$D/containerd.sock" -n k8s.io images import "$img" >/dev/null
done
# the Hub, its CDN and the registry as pods see them: 127.0.0.1:<port> on the node, relayed to the host end of the veth
for p in $RELAY_PORTS; do
  socat "TCP-LISTEN:$p,bind=127.0.0.1,fork,reuseaddr" "TCP:$HOST_IP:$p" >/dev/null 2>&1 &
  echo $! > "$D/relay-$p.pid"
done
exec kubelet --config "$D/kubelet.yaml" --kubeconfig "$D/kubeconfig" --root-dir "$D/kubelet" \
  --cert-dir "$D/kubelet-certs" --hostname-override "$NODE_NAME" --node-ip "$NODE_IP" \
  --node-labels "$NODE_LABELS" -v=1
