"""In-context inference speed and peak memory: our split-form CrossConv vs concatenate-then-convolve.

The same network (same weights) is run three ways, in the same run, on the same inputs:
  concat        the straightforward implementation: every query-support pair is concatenated and
                convolved (UniverSeg's reference CrossConv)
  split         our CrossConv2d: the query and each support entry are convolved once, then added
  split+chunk   split, walking the support 16 entries at a time per level (what `segment` runs)
at support 64, 128 px, batch 1 and 8, fp32 and bf16 (autocast). Reported: queries/s (median of
repeats after a warm-up) and peak memory of one forward pass beyond what was allocated before it:
  CUDA  torch.cuda.max_memory_allocated (reset before the pass)
  CPU   the process's peak resident set size (VmHWM, reset through /proc/self/clear_refs) minus the
        resident size just before the pass; every configuration runs in a fresh subprocess.
Ratios are against `concat` of the same batch and precision. Also: the CPU goal, one 128 px query
with a support of 16 through `weightzoo.incontext.segment` (shipped model), in seconds.

    python benchmarks/incontext_speed.py                  # shipped architecture, CPU (and CUDA if present)
    python benchmarks/incontext_speed.py --universeg      # a UniverSeg-sized network (64 channels, 1.2 M)
    python benchmarks/incontext_speed.py --quick          # batch 1 only, fewer repeats
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

IMPLS = ("concat", "split", "split+chunk")


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    return 0


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        Path("/proc/self/clear_refs").write_text("5")


def _peak_mb(device: torch.device, before: int) -> float:
    if device.type == "cuda":
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    return (_rss_kb("VmHWM") - before) / 1024


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_one(args: argparse.Namespace) -> dict:
    """One configuration (run in its own process): {'queries_per_s', 'peak_mb', 'ms'}."""
    from weightzoo.incontext.model import InContextNet, InContextSpec

    device = torch.device(args.device)
    torch.manual_seed(0)
    spec = InContextSpec(tuple(args.features), args.size, not args.no_set)
    net = InContextNet(spec).to(device).eval()
    q = torch.rand(args.batch, 1, args.size, args.size, device=device)
    s = torch.rand(args.batch, args.support, 2, args.size, args.size, device=device)
    noise = torch.randn(args.batch, 1, 1, args.size, args.size, device=device)
    concat, chunk = args.impl == "concat", 16 if args.impl == "split+chunk" else None
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if args.dtype == "bf16" else nullcontext()

    def run() -> None:
        with torch.no_grad(), amp:
            net(q, s, 1, noise=noise, concat=concat, chunk=chunk)

    run()  # warm-up
    _sync(device)
    before = torch.cuda.memory_allocated(device) if device.type == "cuda" else _rss_kb("VmRSS")
    _reset_peak(device)
    run()
    _sync(device)
    peak = _peak_mb(device, before)
    times = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        run()
        _sync(device)
        times.append(time.perf_counter() - t)
    sec = statistics.median(times)
    return {"queries_per_s": args.batch / sec, "ms": sec * 1000, "peak_mb": peak}


def cpu_goal(size: int = 128, support: int = 16, repeats: int = 5) -> float:
    """Median seconds of incontext.segment(128 px query, support 16) with the shipped model on the CPU."""
    from weightzoo import incontext

    rng = np.random.default_rng(0)
    query = rng.random((size, size)).astype(np.float32)
    sx = [rng.random((size, size)).astype(np.float32) for _ in range(support)]
    sy = [rng.random((size, size)) > 0.5 for _ in range(support)]
    incontext.segment(query, sx, sy, device="cpu")  # load + warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        incontext.segment(query, sx, sy, device="cpu")
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--support", type=int, default=64)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--features", default=None, help="channels per level (default: the shipped model's)")
    ap.add_argument("--universeg", action="store_true", help="64 channels x 4 levels, no set blocks")
    ap.add_argument("--no-set", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-goal", action="store_true", help="skip the segment() latency goal")
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # impl,batch,dtype: one config
    ap.add_argument("--impl", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.universeg:
        args.features, args.no_set = "64,64,64,64", True
    if args.features is None:
        from weightzoo.incontext import load_model

        args.features = ",".join(str(f) for f in load_model(None, "cpu").spec.features)
    args.features = [int(f) for f in args.features.split(",")]
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.one:
        args.impl, batch, args.dtype = args.one.split(",")
        args.batch = int(batch)
        print(json.dumps(measure_one(args)))
        return

    batches = [1] if args.quick else [int(b) for b in args.batches.split(",")]
    dtypes = args.dtypes.split(",")
    repeats = 2 if args.quick else args.repeats
    from weightzoo.incontext.model import InContextNet, InContextSpec, count_parameters

    n_params = count_parameters(InContextNet(InContextSpec(tuple(args.features), args.size, not args.no_set)))
    rows = []
    for dtype in dtypes:
        for batch in batches:
            base = None
            for impl in IMPLS:
                cmd = [
                    sys.executable, __file__, "--one", f"{impl},{batch},{dtype}", "--device", args.device,
                    "--size", str(args.size), "--support", str(args.support), "--repeats", str(repeats),
                    "--features", ",".join(map(str, args.features)),
                ] + (["--no-set"] if args.no_set else [])  # fmt: skip
                res = subprocess.run(cmd, capture_output=True, text=True)
                if res.returncode != 0:
                    print(res.stderr[-2000:], file=sys.stderr)
                    row = {
                        "impl": impl,
                        "batch": batch,
                        "dtype": dtype,
                        "error": res.stderr.strip().splitlines()[-1],
                    }
                else:
                    row = {
                        "impl": impl,
                        "batch": batch,
                        "dtype": dtype,
                        **json.loads(res.stdout.splitlines()[-1]),
                    }
                    base = base or (row if impl == "concat" else None)
                    if base:
                        row["speedup"] = row["queries_per_s"] / base["queries_per_s"]
                        row["memory_ratio"] = row["peak_mb"] / max(base["peak_mb"], 1e-9)
                rows.append(row)
                print(json.dumps(row), flush=True)
    goal = cpu_goal() if not args.universeg and not args.no_goal else None
    dev = (
        torch.cuda.get_device_name(0)
        if args.device == "cuda"
        else (platform.processor() or platform.machine())
    )
    head = (
        f"Date {datetime.date.today()} · device {args.device} ({dev}), torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads · network {args.features} ({n_params / 1e6:.2f} M parameters), "
        f"support {args.support}, {args.size} px"
    )
    print("\n" + head + "\n")
    print(
        "| impl | batch | precision | queries/s | ms / forward | peak MB | speed vs concat | memory vs concat |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['impl']} | {r['batch']} | {r['dtype']} | error: {r['error']} | | | | |")
            continue
        print(
            f"| {r['impl']} | {r['batch']} | {r['dtype']} | {r['queries_per_s']:.2f} | {r['ms']:.0f} | "
            f"{r['peak_mb']:.0f} | {r.get('speedup', float('nan')):.2f}x | {r.get('memory_ratio', float('nan')):.2f}x |"
        )
    if goal is not None:
        print(f"\nCPU goal: segment(128 px query, support 16), shipped model: {goal:.3f} s (goal < 1 s)")
    if args.out:
        Path(args.out).write_text(json.dumps({"header": head, "rows": rows, "cpu_goal_s": goal}, indent=2))


if __name__ == "__main__":
    main()
