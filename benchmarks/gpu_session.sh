#!/usr/bin/env bash
# The GPU measurements of docs/benchmarks.md, as run on a lent H100 (2026-11-23). A device machine
# is held for at most ~30 minutes, so the long job (weight generation, issue 4) runs detached
# (setsid) and later calls poll it:
#   bash benchmarks/gpu_session.sh start    # set up, launch the generation benchmark in the background
#   bash benchmarks/gpu_session.sh poll 580 # wait up to 580 s for it; copy logs/tables to $OUT
#   bash benchmarks/gpu_session.sh speed    # zoo build (issue 3) and in-context (issue 6) speed tables
#   bash benchmarks/gpu_session.sh scaling  # issue 11 (<= 10 min): the largest micro zoo that fits,
#                                           # its generators, then the throughput table on the GPU
#   bash benchmarks/gpu_session.sh hyper    # issue 18 (<= 10 min): the hypernetwork front at 128 px
#   bash benchmarks/gpu_session.sh distributed  # issue 15 (<= 5 min): DDP / local SGD with CUDA tensors
# Python deps missing from the machine's image travel as wheels in .whl/ (see the device README).
set -u
W=${WORK:-/tmp/wz_gpu}
OUT=${OUT:-$W/out}
mkdir -p "$W" "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
  export PYTHONPATH=/tmp/site:$PWD/src
else
  export PYTHONPATH=$PWD/src
fi
export PYTHONUNBUFFERED=1
case "${1:-}" in
  start)
    nvidia-smi -L
    python3 -c "import torch, weightzoo, monai, nibabel; print('torch', torch.__version__, torch.cuda.get_device_name(0))" || exit 1
    setsid nohup bash -c "python3 benchmarks/generate_eval.py --work $W --zoo-preset small --zoo-seeds 10 \
        --preset small --device cuda --jobs 3 --gen-budget-s ${GEN_BUDGET:-420} --no-ablation \
        > $W/gen.log 2>&1; echo \$? > $W/DONE" > /dev/null 2>&1 &
    sleep 2; echo "launched"
    ;;
  poll)
    limit=${2:-580}; t=0
    while [ ! -f "$W/DONE" ] && [ "$t" -lt "$limit" ]; do sleep 10; t=$((t + 10)); done
    tail -n 40 "$W/gen.log"; nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv
    cp "$W/gen.log" "$OUT/" 2>/dev/null
    for f in tables.md results.json; do cp "$W/$f" "$OUT/" 2>/dev/null; done
    cp "$W/eval/summary.json" "$OUT/gen_eval_summary.json" 2>/dev/null
    cp "$W/eval/report.html" "$OUT/gen_eval_report.html" 2>/dev/null
    [ -f "$W/DONE" ] && echo "DONE rc=$(cat "$W/DONE")" || echo "still running"
    ;;
  speed)
    timeout 240 python3 benchmarks/zoo_build.py --device cuda --steps 50 --runs 1 8 32 64 --presets tiny small --size 64 --batch-size 8 \
      2>&1 | tee "$OUT/zoo_build_cuda.txt"
    timeout 150 python3 benchmarks/incontext_speed.py --device cuda --no-goal --out "$OUT/incontext_speed_cuda.json" \
      2>&1 | tee "$OUT/incontext_speed_cuda.txt"
    ;;
  scaling)
    nvidia-smi -L
    timeout 340 python3 benchmarks/generate_scaling.py --work "$W/scaling" --device cuda \
      --sizes 1000 3000 10000 30000 --parallel 1024 --figure "$OUT/generate_scaling_cuda.png" \
      2>&1 | tail -n 30 | tee "$OUT/generate_scaling_cuda.txt"
    cp "$W"/scaling/size-*.json "$OUT/" 2>/dev/null
    timeout 200 python3 benchmarks/zoo_build.py --device cuda --steps 50 --runs 1 64 128 \
      2>&1 | tee "$OUT/zoo_build_micro_cuda.txt"
    ;;
  hyper)
    # issue 18 (<= 10 min): the scale hypernetwork's front at 128 px vs fixed-φ networks, trained and
    # timed on the GPU (one seed: the CPU study has three), GPU latency per φ
    nvidia-smi -L
    timeout 540 python3 benchmarks/hyper_bench.py front --preset small --size 128 --device cuda --steps 600 \
      --seeds 0 --subjects 20 --out "$OUT" --figures "$OUT" 2>&1 | tail -n 40 | tee "$OUT/hyper_front_cuda.txt"
    ;;
  distributed)
    # issue 15 (<= 5 min): the data-parallel path with CUDA tensors. One GPU: nccl wants a GPU per rank,
    # so 2 ranks sharing it all-reduce through gloo (weightzoo's rule); nccl itself is only shown with
    # >= 2 GPUs (then: the same commands, --nproc-per-node = the GPU count).
    nvidia-smi -L
    python3 -c "import torch.distributed as d; print('nccl', d.is_nccl_available(), 'gloo', d.is_gloo_available())"
    python3 -c "from weightzoo.data.synth import make_phantom_dataset as m; m('$W/dd', sites=2, subjects_per_site=6, size=64, n_slices=8)"
    D=$(ls -d "$W"/dd/Dataset*)
    A="train -d $D -t cord,gm --preset small --steps 200 --batch-size 16 --device cuda --no-progress"
    ( time python3 -m weightzoo $A --out "$W/plain" ) 2>&1 | tail -n 4 | tee "$OUT/dist_plain.txt"
    ( time python3 -m torch.distributed.run --standalone --nproc-per-node 2 -m weightzoo $A --out "$W/ddp2" --ddp ) 2>&1 | tail -n 4 | tee "$OUT/dist_ddp2.txt"
    ( time python3 -m torch.distributed.run --standalone --nproc-per-node 2 -m weightzoo $A --out "$W/lsgd" --local-sgd 16 --slowmo 0.5 ) 2>&1 | tail -n 4 | tee "$OUT/dist_lsgd.txt"
    python3 - "$W" <<'PY' | tee "$OUT/dist_compare.txt"
import json, sys
from safetensors.torch import load_file
w = sys.argv[1]
a, b = load_file(f"{w}/plain/model.safetensors"), load_file(f"{w}/ddp2/model.safetensors")
print("max |plain - ddp2| over weights:", max(float((a[k] - b[k]).abs().max()) for k in a))
for run in ("ddp2", "lsgd"):
    info = json.load(open(f"{w}/{run}/model.json"))["info"]
    print(run, "val Dice", info["final"].get("val_dice"), "comm", info["distributed"]["communication"])
PY
    ;;
  *) echo "usage: $0 start|poll [SECONDS]|speed|scaling|hyper|distributed"; exit 2 ;;
esac
