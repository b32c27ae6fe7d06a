#!/usr/bin/env bash
# Issue #12 speed target, on real nodes: a 3-node cluster with shared sshfs storage (e2e/cluster/up), the chart
# installed with helm, one 1 GiB ClusterBaseModel; prints CR -> last node Ready against one plain `modelherd pull`
# of the same model through the same filesystem, measured in the same run, and the ratio
# (target <= 1.2 x plain + 10 s). Needs root (network namespaces); tears the cluster down afterwards.
#   bash bench/bench_e2e_shared.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
exec e2e/run -k "a_1_gib_model" "$@"
