"""Zoo build throughput: model-steps/s, checkpoints/minute and runs/hour, batched vs sequential.

For each preset and M (default: micro, 32 px, batch 4, M in 1, 64, 128), the same M runs (seeds 0..M-1,
SGD, augmentation 1, the same steps and checkpoints) are built twice into fresh zoos: once trained one
after the other (`sequential`, torch.optim + nn.Module, as `weightzoo train`) and once together
(`batched`: stacked parameters, one grouped-convolution network, weightzoo.zoo.grouped). Timed:
training, evaluation at every saved checkpoint and the atomic commits — a zoo build minus loading the
slices (done once). Reported: model-steps/s = M·steps / seconds, checkpoints/minute, runs/hour, the
hours a 10,000-run zoo of these runs would take, and the batched/sequential ratio measured in the same
run (ABBA order, `--repeats` rounds, medians: the machine's load may drift).

    python benchmarks/zoo_build.py                          # the issue-11 table: micro, 32 px
    python benchmarks/zoo_build.py --presets tiny small --size 64 --batch-size 8 --runs 1 8 32
    python benchmarks/zoo_build.py --quick                  # micro, M = 1 and 8, 10 steps
    python benchmarks/zoo_build.py --device cuda --runs 1 64 256 1024
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
    ds,
    data,
    preset: str,
    m: int,
    mode: str,
    steps: int,
    checkpoints: int,
    device: torch.device,
    root: Path,
    batch_size: int = 8,
    size: int = 64,
) -> float:
    """Seconds to build M runs in `mode` (training + evaluation + commits)."""
    grid = {
        "tasks": ["cord"],
        "sites": ["A"],
        "seeds": m,
        "preset": preset,
        "steps": steps,
        "batch_size": batch_size,
        "checkpoints": checkpoints,
        "optimizer": "sgd",
        "size": [size, size],
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
    ap.add_argument("--quick", action="store_true", help="M = 1 and 8, 10 steps")
    ap.add_argument("--device", choices=["all", "cpu", "cuda"], default="all")
    ap.add_argument("--steps", type=int, default=100, help="training steps per run")
    ap.add_argument("--checkpoints", type=int, default=2, help="random checkpoints per run (+ init + final)")
    ap.add_argument("--runs", type=int, nargs="*", default=None, help="values of M (default 1 64 128)")
    ap.add_argument("--presets", nargs="*", default=None, help="default: micro")
    ap.add_argument("--size", type=int, default=32, help="slice size (px)")
    ap.add_argument("--batch-size", type=int, default=4)
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
    ms = args.runs or ([1, 8] if args.quick else [1, 64, 128])
    steps = 10 if args.quick else args.steps
    presets = args.presets or ["micro"]
    n_ck = args.checkpoints + 2
    print(
        f"date: {datetime.date.today().isoformat()} · torch {torch.__version__} · {steps} steps, "
        f"{n_ck} checkpoints per run, batch {args.batch_size}, {args.size} px"
    )
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ds = make_phantom_dataset(
            root / "data", sites=1, subjects_per_site=10, size=args.size, n_slices=8, seed=0
        )
        for device in devices:
            print(f"device: {device_line(device)}")
            data = load_zoo_data(
                ds,
                Grid({"tasks": ["cord"], "sites": ["A"], "preset": "tiny"}).expand(ds),
                Preprocessing(size=(args.size, args.size), channels=1),
            )
            print()
            print(
                "| device | preset | params | M runs | sequential model-steps/s | batched model-steps/s "
                "| sequential ckpt/min | batched ckpt/min | batched runs/hour | 10,000 runs (h) "
                "| batched / sequential |"
            )
            print("|---|---|---|---|---|---|---|---|---|---|---|")
            for preset in presets:
                n_params = count_parameters(build_network(ArchSpec.preset(preset)))

                def one(
                    m: int,
                    mode: str,
                    where: Path,
                    n_steps: int = steps,
                    n_ck: int = args.checkpoints,
                    data=data,
                    preset: str = preset,
                    device: torch.device = device,
                ) -> float:
                    return bench(
                        ds, data, preset, m, mode, n_steps, n_ck, device, where, args.batch_size, args.size
                    )

                one(2, "batched", root / "warmup", 2, 0)  # imports, kernels
                for m in ms:
                    # ABBA order, medians: cancels a machine load that drifts during the measurement
                    order = (
                        ["sequential", "batched", "batched", "sequential"] * args.repeats
                        if m > 1
                        else ["sequential"] * args.repeats
                    )
                    times: dict[str, list[float]] = {"sequential": [], "batched": []}
                    for i, mode in enumerate(order):
                        times[mode].append(one(m, mode, root / f"{preset}-{m}-{i}"))
                    t_seq = statistics.median(times["sequential"])
                    t_bat = statistics.median(times["batched"]) if m > 1 else t_seq
                    sps = [m * steps / t for t in (t_seq, t_bat)]
                    cpm = [60 * m * n_ck / t for t in (t_seq, t_bat)]
                    runs_h = 3600 * m / t_bat
                    print(
                        f"| {device.type} | {preset} | {n_params / 1e3:.1f} k | {m} | {sps[0]:.1f} | "
                        + (f"{sps[1]:.1f}" if m > 1 else "—")
                        + f" | {cpm[0]:.0f} | "
                        + (f"{cpm[1]:.0f}" if m > 1 else "—")
                        + f" | {runs_h:,.0f} | {10_000 / runs_h:.1f} | "
                        + (f"{t_seq / t_bat:.2f}× |" if m > 1 else "— |"),
                        flush=True,
                    )


if __name__ == "__main__":
    main()
