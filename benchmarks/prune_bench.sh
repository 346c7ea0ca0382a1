#!/usr/bin/env bash
# Issue 14: pruning measured the ShrinkBench way, on phantoms at 64 px, on this machine's CPU.
# One small-preset nnU-Net (cord + gm, 2 sites, sgd, 1000 steps), then `weightzoo prune bench`:
# 4 masking methods × compression 2, 4, 8, 10, 16, 32 and 2 channel methods × FLOP speedup 1.5, 2, 3,
# 3 seeds each, ONE fine-tuning budget (100 Adam steps, lr 1e-3, batch 16) for every cell, and the
# unpruned network given the same budget as a control. Scores: test split (never used to choose).
# Resumable: re-run the same command after a kill.
#   bash benchmarks/prune_bench.sh WORK_DIR
set -euo pipefail
W=${1:-bench_prune}
mkdir -p "$W/data"
[ -n "$(ls -d "$W"/data/Dataset*_Phantom 2>/dev/null)" ] || \
  weightzoo data synth --out "$W/data" --sites 2 --subjects 20 --size 64 --slices 8 --seed 0
DS=$(ls -d "$W"/data/Dataset*_Phantom)
t0=$(date +%s)
weightzoo train --dataset "$DS" --task cord,gm --preset small --steps 1000 --out "$W/model" --no-progress
echo "model trained in $(( $(date +%s) - t0 )) s"
weightzoo prune bench -m "$W/model" -d "$DS" -o "$W/bench" \
  --methods global-magnitude,layer-magnitude,global-gradient,random,channels,channels-random \
  --ratios 2,4,8,10,16,32 --speedups 1.5,2,3 --seeds 3 --finetune-steps 100 --no-progress
echo "total $(( $(date +%s) - t0 )) s, $(nproc) cores, torch threads: $(python -c 'import torch; print(torch.get_num_threads())')"
