"""Where a zoo build spends its time: seconds per phase, sequential vs batched (vmap) vs batched (grouped).

M runs of one preset (seeds 0..M-1, cord, site A, SGD, augmentation 1) are built into fresh zoos three
ways, with every phase timed (`weightzoo.zoo.runs.Phases`):

  draw      per run: batch indices and augmentation draws from the run's own generators
  augment   applying the draws (batched: all M runs' batches in one call)
  forward, backward / update   (sequential: one `train_step`, both together)
  evaluate  scoring every saved checkpoint (train subset + validation slices)
  commit    copying weights to the CPU and committing them to the zoo (SQLite + safetensors)

With `--compile` it also times one forward + backward of the M grouped networks under torch.compile
(compile time reported separately), the third option the issue names.

    python benchmarks/zoo_build_profile.py                     # micro, 32 px, M = 64, 50 steps
    python benchmarks/zoo_build_profile.py --runs 128 --compile
"""

from __future__ import annotations

import argparse
import datetime
import tempfile
import time
from pathlib import Path

import torch

from weightzoo.data.slices import Preprocessing
from weightzoo.data.synth import make_phantom_dataset
from weightzoo.nets.unet import ArchSpec, build_network, count_parameters
from weightzoo.zoo.batched import StackedRuns, train_batched
from weightzoo.zoo.build import CheckpointWriter, register_plans
from weightzoo.zoo.grid import Grid
from weightzoo.zoo.grouped import grouped_forward
from weightzoo.zoo.runs import Phases, load_zoo_data, train_sequential
from weightzoo.zoo.store import Zoo

PHASES = ("draw", "augment", "forward, backward", "update", "forward, backward, update", "evaluate", "commit")


def build(ds, data, grid: dict, how: str, root: Path) -> tuple[float, Phases]:
    """Seconds and phases of building the grid's runs `how` (sequential | vmap | grouped)."""
    plans = Grid(grid).expand(ds)
    c = plans[0].config
    prep = Preprocessing(c.normalization, tuple(c.size), c.axis, ds.n_channels)
    device = torch.device("cpu")
    phases = Phases(device)
    with Zoo(root / how, create=True, writable=True) as zoo:
        register_plans(zoo, ds, plans, prep)
        datas = [data.run_data(p, device) for p in plans]
        writer = CheckpointWriter(zoo, {p.run_id: p for p in plans}, 512 * 2**20)
        t = time.perf_counter()
        if how == "sequential":
            for p, d in zip(plans, datas, strict=True):
                train_sequential(p, d, device, writer, phases=phases)
        else:
            train_batched(plans, datas, device, writer, phases=phases, forward=how)
        with phases("commit"):
            writer.flush()
        seconds = time.perf_counter() - t
        assert len(zoo.checkpoints()) == sum(p.n_planned for p in plans)
    return seconds, phases


def compiled_step(
    preset: str, m: int, batch: int, size: int, repeats: int = 10
) -> tuple[float, float, float]:
    """(compile seconds, eager ms, compiled ms) for one forward + backward of m grouped networks."""
    spec = ArchSpec.preset(preset)
    from weightzoo.train.config import TrainConfig

    cfgs = [TrainConfig(tasks=["t"], preset=preset, size=(size, size), seed=s) for s in range(m)]
    runs = StackedRuns.make(spec, cfgs, torch.device("cpu"))
    x = torch.randn(m, batch, 1, size, size)
    params = {n: t.clone().requires_grad_(True) for n, t in runs.params.items()}

    def loss(p: dict[str, torch.Tensor], xx: torch.Tensor) -> torch.Tensor:
        return grouped_forward(runs.base, p, xx).square().mean()

    compiled = torch.compile(loss)
    t = time.perf_counter()
    compiled(params, x).backward()
    t_compile = time.perf_counter() - t
    out = [t_compile]
    for fn in (loss, compiled):
        for _ in range(2):
            fn(params, x).backward()
        t = time.perf_counter()
        for _ in range(repeats):
            fn(params, x).backward()
        out.append((time.perf_counter() - t) / repeats * 1e3)
    return out[0], out[1], out[2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="micro")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--runs", type=int, default=64, help="M")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--checkpoints", type=int, default=2, help="random checkpoints per run (+ init + final)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--compile", action="store_true", help="also time torch.compile of the grouped step")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    n_params = count_parameters(build_network(ArchSpec.preset(args.preset)))
    print(
        f"date: {datetime.date.today().isoformat()} · torch {torch.__version__} · CPU, "
        f"{torch.get_num_threads()} threads · preset {args.preset} ({n_params} params), {args.size} px, "
        f"M = {args.runs}, {args.steps} steps, batch {args.batch_size}, {args.checkpoints + 2} checkpoints per run"
    )
    grid = {
        "tasks": ["cord"],
        "sites": ["A"],
        "seeds": args.runs,
        "preset": args.preset,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "checkpoints": args.checkpoints,
        "size": [args.size, args.size],
    }
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ds = make_phantom_dataset(
            root / "data", sites=1, subjects_per_site=12, size=args.size, n_slices=8, seed=0
        )
        plans = Grid(grid).expand(ds)
        data = load_zoo_data(ds, plans, Preprocessing(size=(args.size, args.size), channels=1))
        build(ds, data, {**grid, "seeds": 2, "steps": 2}, "grouped", root / "warmup")  # imports, kernels
        results = {how: build(ds, data, grid, how, root) for how in ("sequential", "vmap", "grouped")}
    print()
    print("| phase | " + " | ".join(f"{h} s (%)" for h in results) + " |")
    print("|---|" + "---|" * len(results))
    for ph in PHASES:
        if not any(ph in r[1].seconds for r in results.values()):
            continue
        cells = []
        for seconds, phases in results.values():
            v = phases.seconds.get(ph)
            cells.append("—" if v is None else f"{v:.2f} ({100 * v / seconds:.0f} %)")
        print(f"| {ph} | " + " | ".join(cells) + " |")
    t_seq = results["sequential"][0]
    print("| **total** | " + " | ".join(f"**{s:.2f}**" for s, _ in results.values()) + " |")
    print(
        "| model-steps/s | "
        + " | ".join(f"{args.runs * args.steps / s:.0f}" for s, _ in results.values())
        + " |"
    )
    print("| vs sequential | " + " | ".join(f"{t_seq / s:.2f}×" for s, _ in results.values()) + " |")
    if args.compile:
        tc, eager, comp = compiled_step(args.preset, args.runs, args.batch_size, args.size)
        print(
            f"\ntorch.compile of the grouped forward + backward (M = {args.runs}): compile {tc:.1f} s, "
            f"eager {eager:.1f} ms, compiled {comp:.1f} ms per step ({eager / comp:.2f}×)"
        )


if __name__ == "__main__":
    main()
