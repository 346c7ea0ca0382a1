"""Zoo build throughput: model-steps/s and checkpoints/minute, batched vs sequential, M runs at once.

For each preset (tiny, small; 64 px phantoms) and M in 1, 8, 32, 128, the same M runs (seeds 0..M-1,
SGD, augmentation 1, batch 8, the same steps and checkpoints) are built twice into fresh zoos: once
trained one after the other (`sequential`, torch.optim + nn.Module, as `weightzoo train`) and once
together (`batched`, vmapped stacked parameters). Timed: training, evaluation at every saved
checkpoint and the atomic commits — a zoo build minus loading the slices (done once). Reported:
model-steps/s = M·steps / seconds, checkpoints/minute, and the batched/sequential ratio measured in
the same run (in ABBA order, `--repeats` rounds, medians: the machine's load may drift).

    python benchmarks/zoo_build.py                 # CPU (and CUDA when visible)
    python benchmarks/zoo_build.py --quick         # tiny preset, M = 1 and 8
    python benchmarks/zoo_build.py --device cuda --steps 50
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import tempfile
import time
from pathlib import Path

import torch

from weightzoo.data.slices import Preprocessing
from weightzoo.data.synth import make_phantom_dataset
from weightzoo.nets.unet import ArchSpec, build_network, count_parameters
from weightzoo.zoo.build import CheckpointWriter, register_plans, train_group
from weightzoo.zoo.grid import Grid
from weightzoo.zoo.runs import load_zoo_data
from weightzoo.zoo.store import Zoo


def device_line(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = "CPU"
    return f"CPU {cpu}, {torch.get_num_threads()} torch threads"


def bench(
    ds, data, preset: str, m: int, mode: str, steps: int, checkpoints: int, device: torch.device, root: Path
) -> float:
    """Seconds to build M runs in `mode` (training + evaluation + commits)."""
    grid = {
        "tasks": ["cord"],
        "sites": ["A"],
        "seeds": m,
        "preset": preset,
        "steps": steps,
        "batch_size": 8,
        "checkpoints": checkpoints,
        "optimizer": "sgd",
    }
    plans = Grid(grid).expand(ds)
    c = plans[0].config
    prep = Preprocessing(c.normalization, tuple(c.size), c.axis, ds.n_channels)
    with Zoo(root / f"{preset}-{m}-{mode}", create=True, writable=True) as zoo:
        register_plans(zoo, ds, plans, prep)
        datas = [data.run_data(p, device) for p in plans]
        writer = CheckpointWriter(zoo, {p.run_id: p for p in plans}, 512 * 2**20)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        used = train_group(plans, datas, device, writer, [set() for _ in plans], mode)
        writer.flush()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t
        assert used == mode or m == 1, (used, mode)
        assert len(zoo.checkpoints()) == m * (checkpoints + 2)
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny preset, M = 1 and 8")
    ap.add_argument("--device", choices=["all", "cpu", "cuda"], default="all")
    ap.add_argument("--steps", type=int, default=10, help="training steps per run")
    ap.add_argument("--checkpoints", type=int, default=2, help="random checkpoints per run (+ init + final)")
    ap.add_argument("--runs", type=int, nargs="*", default=None, help="values of M (default 1 8 32 128)")
    ap.add_argument("--presets", nargs="*", default=None, help="default: tiny small")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--repeats", type=int, default=1, help="ABBA rounds per row (medians reported)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = [torch.device("cpu")] if args.device in ("all", "cpu") else []
    if args.device in ("all", "cuda") and torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    if not devices:
        raise SystemExit("no CUDA device visible; use --device cpu")
    ms = args.runs or ([1, 8] if args.quick else [1, 8, 32, 128])
    presets = args.presets or (["tiny"] if args.quick else ["tiny", "small"])
    n_ck = args.checkpoints + 2
    print(
        f"date: {datetime.date.today().isoformat()} · torch {torch.__version__} · {args.steps} steps, {n_ck} checkpoints per run, batch 8, 64 px"
    )
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ds = make_phantom_dataset(root / "data", sites=1, subjects_per_site=10, size=64, n_slices=8, seed=0)
        for device in devices:
            print(f"device: {device_line(device)}")
            data = load_zoo_data(
                ds,
                Grid({"tasks": ["cord"], "sites": ["A"], "preset": "tiny"}).expand(ds),
                Preprocessing(channels=1),
            )
            print()
            print(
                "| device | preset | params | M runs | sequential steps/s | batched steps/s | sequential ckpt/min | batched ckpt/min | batched / sequential |"
            )
            print("|---|---|---|---|---|---|---|---|---|")
            for preset in presets:
                n_params = count_parameters(build_network(ArchSpec.preset(preset)))
                bench(ds, data, preset, 2, "batched", 2, 0, device, root / "warmup")  # imports, kernels
                for m in ms:
                    # ABBA order, medians: cancels a machine load that drifts during the measurement
                    order = (
                        ["sequential", "batched", "batched", "sequential"] * args.repeats
                        if m > 1
                        else ["sequential"] * args.repeats
                    )
                    times: dict[str, list[float]] = {"sequential": [], "batched": []}
                    for i, mode in enumerate(order):
                        times[mode].append(
                            bench(
                                ds, data, preset, m, mode, args.steps, args.checkpoints, device, root / str(i)
                            )
                        )
                    t_seq = statistics.median(times["sequential"])
                    t_bat = statistics.median(times["batched"]) if m > 1 else t_seq
                    sps = [m * args.steps / t for t in (t_seq, t_bat)]
                    cpm = [60 * m * n_ck / t for t in (t_seq, t_bat)]
                    print(
                        f"| {device.type} | {preset} | {n_params / 1e3:.0f} k | {m} | {sps[0]:.1f} | "
                        + (f"{sps[1]:.1f}" if m > 1 else "—")
                        + f" | {cpm[0]:.0f} | "
                        + (f"{cpm[1]:.0f} | {t_seq / t_bat:.2f}× |" if m > 1 else "— | — |"),
                        flush=True,
                    )


if __name__ == "__main__":
    main()
