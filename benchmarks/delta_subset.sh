#!/usr/bin/env bash
# Issue 10, part 4: WHICH SUBSET should the delta generator learn? Phantoms (6 sites, 32 px), one
# tiny-preset base (cord + gm + canal) small enough that an all-weights delta (~4.6 k values) can be
# diffused directly, no latent autoencoder. Zoo: 5 seeds of norm+seg fine-tunes and 5 of all-weights
# fine-tunes. Five generators learn the norm+seg deltas, five the all-weights deltas (every run);
# `generate eval` scores both sets against the same zoo best, soups and noisy-nearest baseline (TEST).
#   bash benchmarks/delta_subset.sh WORK_DIR
set -euo pipefail
W=${1:-bench_subset}
mkdir -p "$W/data"
[ -n "$(ls -d "$W"/data/Dataset*_Phantom 2>/dev/null)" ] || \
  weightzoo data synth --out "$W/data" --sites 6 --subjects 12 --size 32 --slices 8 --seed 0
DS=$(ls -d "$W"/data/Dataset*_Phantom)
t0=$(date +%s)
weightzoo base train --dataset "$DS" --tasks cord,gm,canal --preset tiny --steps 1500 --batch-size 16 \
  --size 32 --out "$W/base" --no-progress
for sub in norm_seg all; do
  cat > "$W/grid_$sub.yaml" <<YAML
from: base
tasks: [cord, gm, canal]
sites: [A, B, C, D, E, F]
seeds: 5
trainable: $sub
optimizer: adam
lr: 1.0e-3
steps: 60
batch_size: 8
checkpoints: 2
run_split: {train: 0.6, val: 0.2, test: 0.2}
YAML
  weightzoo zoo build --dataset "$DS" --grid "$W/grid_$sub.yaml" --zoo "$W/zoo" --no-progress
done
echo "base + zoo in $(( $(date +%s) - t0 )) s"
for sub in norm_seg all; do
  gens=()
  for s in 0 1 2 3 4; do
    weightzoo generate train --zoo "$W/zoo" --out "$W/gen_${sub}_$s" --subset "$sub" --steps 1000 --seed "$s"
    gens+=(-g "$W/gen_${sub}_$s")
  done
  weightzoo generate eval "${gens[@]}" --zoo "$W/zoo" --dataset "$DS" --out "$W/eval_$sub" --candidates 8
  echo "subset $sub done at $(( $(date +%s) - t0 )) s"
done
python "$(dirname "$0")/delta_subset_table.py" "$W"
