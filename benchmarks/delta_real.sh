#!/usr/bin/env bash
# Issue 10 on real data, through the CLI. One base and a zoo of its fine-tunes on the zoo sites only;
# the other sites are never seen (G4 on real sites: generated from 8 unlabelled images, against a
# labelled 100-step fine-tune of the base). Five delta generators; `generate eval` scores TEST only.
#   bash benchmarks/delta_real.sh wbc|axon|nuclei WORK_DIR [SHARED_DATA_DIR]
# wbc:    WBC Dataset1 (zoo) vs Dataset2 (unseen); tasks nucleus, cell.
# axon:   AxonDeepSeg SEM (zoo) vs TEM (unseen); tasks axon, myelin (256 px crops -> 64 px).
# nuclei: DSB 2018, five acquisition types (zoo) vs two unseen: brightfield 1024 px (a modality no
#         zoo site has) and fluorescence 512x640 (a new experiment of a known modality); task nucleus.
set -euo pipefail
KIND=${1:?wbc|axon|nuclei}
W=${2:-bench_$KIND}
SHARED=${3:-../shared/data}
mkdir -p "$W/data"
case $KIND in
  wbc)
    [ -n "$(ls -d "$W"/data/Dataset*_WBC 2>/dev/null)" ] || weightzoo data import-wbc "$SHARED/wbc" "$W/data" --limit 100 --size 64
    DS=$(ls -d "$W"/data/Dataset*_WBC); TASKS=nucleus,cell; GRID_TASKS="[nucleus, cell, [nucleus, cell]]"
    ZOO_SITES=(Dataset1); UNSEEN=(Dataset2) ;;
  axon)
    [ -n "$(ls -d "$W"/data/Dataset*_AxonEM 2>/dev/null)" ] || weightzoo data import-axondeepseg \
      "$SHARED/axondeepseg_sem" "$SHARED/axondeepseg_tem" -o "$W/data"
    DS=$(ls -d "$W"/data/Dataset*_AxonEM); TASKS=axon,myelin; GRID_TASKS="[axon, myelin, [axon, myelin]]"
    ZOO_SITES=(SEM); UNSEEN=(TEM) ;;
  nuclei)
    [ -n "$(ls -d "$W"/data/Dataset*_DSB2018 2>/dev/null)" ] || weightzoo data import-dsb2018 \
      "$SHARED/dsb2018_nuclei" -o "$W/data" --per-site 40
    DS=$(ls -d "$W"/data/Dataset*_DSB2018); TASKS=nucleus; GRID_TASKS="[nucleus]"
    ZOO_SITES=(fluo-256x256 fluo-360x360 fluo-520x696 fluo-other stained-256x320)
    UNSEEN=(bright-1024x1024 fluo-512x640) ;;
  *) echo "error: unknown kind '$KIND' — use wbc, axon or nuclei" >&2; exit 2 ;;
esac
t0=$(date +%s)
site_args=(); for s in "${ZOO_SITES[@]}"; do site_args+=(--site "$s"); done
weightzoo base train --dataset "$DS" --tasks "$TASKS" "${site_args[@]}" --preset small --steps 600 \
  --batch-size 16 --size 64 --out "$W/base" --no-progress
sites_yaml=$(IFS=,; echo "[${ZOO_SITES[*]}]")
for sub in norm_seg all; do
  seeds=$([ $sub = norm_seg ] && echo 5 || echo 2)
  cat > "$W/grid_$sub.yaml" <<YAML
from: base
tasks: $GRID_TASKS
sites: $sites_yaml
seeds: $seeds
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
gens=()
for s in 0 1 2 3 4; do
  weightzoo generate train --zoo "$W/zoo" --out "$W/gen$s" --steps 1000 --seed "$s"
  gens+=(-g "$W/gen$s")
done
echo "built in $(( $(date +%s) - t0 )) s"
weightzoo generate eval "${gens[@]}" --zoo "$W/zoo" --dataset "$DS" --out "$W/eval" --candidates 8
echo "generate eval done at $(( $(date +%s) - t0 )) s"
# The labelled reference of G4: base + 100 steps of all-weights fine-tuning on each unseen site.
here=$(dirname "$0")
for s in "${UNSEEN[@]}"; do
  python "$here/finetune_site.py" --base "$W/base" --dataset "$DS" --site "$s" --tasks "$TASKS" \
    --steps 100 --seeds 5 | tee "$W/labelled_$s.txt"
done
echo "total $(( $(date +%s) - t0 )) s"
python "$here/delta_real_tables.py" "$W"
