#!/usr/bin/env bash
# Issue 10 on real data, through the CLI: WBC (two sources = two sites). One nucleus+cell base and a zoo
# of its fine-tunes on Dataset1 only; Dataset2 is never seen (G4 on a real site: generated from 8
# unlabelled images). Five delta generators; `generate eval` scores on TEST subjects only.
#   bash benchmarks/delta_wbc.sh WORK_DIR [SHARED_DATA_DIR]
set -euo pipefail
W=${1:-bench_wbc}
SHARED=${2:-../shared/data}
mkdir -p "$W"
[ -d "$W/data" ] || weightzoo data import-wbc "$SHARED/wbc" "$W/data" --limit 100 --size 64
DS=$(ls -d "$W"/data/Dataset*_WBC)
t0=$(date +%s)
weightzoo base train --dataset "$DS" --tasks nucleus,cell --site Dataset1 --preset small --steps 600 \
  --batch-size 16 --size 64 --out "$W/base" --no-progress
for sub in norm_seg all; do
  seeds=$([ $sub = norm_seg ] && echo 5 || echo 2)
  cat > "$W/grid_$sub.yaml" <<EOF
from: base
tasks: [nucleus, cell, [nucleus, cell]]
sites: [Dataset1]
seeds: $seeds
trainable: $sub
optimizer: adam
lr: 1.0e-3
steps: 60
batch_size: 8
checkpoints: 2
run_split: {train: 0.6, val: 0.2, test: 0.2}
EOF
  weightzoo zoo build --dataset "$DS" --grid "$W/grid_$sub.yaml" --zoo "$W/zoo" --no-progress
done
gens=()
for s in 0 1 2 3 4; do
  weightzoo generate train --zoo "$W/zoo" --out "$W/gen$s" --steps 1000 --seed "$s"
  gens+=(-g "$W/gen$s")
done
echo "built in $(( $(date +%s) - t0 )) s"
weightzoo generate eval "${gens[@]}" --zoo "$W/zoo" --dataset "$DS" --out "$W/eval" --candidates 8
echo "total $(( $(date +%s) - t0 )) s"
