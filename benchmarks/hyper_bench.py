"""Hypernetworks measured: the scale-space front, MIP vs the default parametrization, batched conditions.

  front    ONE scale hypernetwork (SSHN-style, φ ~ U[0.25, 0.75] per step) vs fixed-φ scale-space
           U-Nets trained at φ ∈ {0.25, 0.375, 0.5, 0.625, 0.75}, same recipe and steps, per seed.
           Test Dice (mean over test subjects) at each φ, exact conv FLOPs, CPU latency (one slice,
           median, φ interleaved), and training CPU seconds (hypernetwork / one fixed network).
  mip      MIP vs default parametrization, scale and site conditions: val Dice every 10 steps, final
           val Dice, steps for MIP to reach the default's final val Dice, loss spikes (a step whose loss
           exceeds 2x the median of the 20 before it).
  batched  forward + backward of a site HyperUNet on a batch of 64 with ONE condition vs 64 DIFFERENT
           conditions (grouped convolutions), and vs a loop of 64 single-condition calls.

Phantoms (weightzoo.data.synth), split by subject (train / val / test); nothing is selected on test:
every network is its last iterate. torch runs with one thread and times are CPU seconds of this
process (time.process_time), so ratios hold on a shared machine (with --device cuda: synchronised wall
seconds, and the GPU's latency). Each part is resumable: finished
runs are kept in OUT/<part>.json and skipped when the command is run again.

    python benchmarks/hyper_bench.py front --preset small --steps 600 --seeds 0 1 2 --out runs/hyper
    python benchmarks/hyper_bench.py mip --preset tiny --steps 400 --seeds 0 1 2 --out runs/hyper
    python benchmarks/hyper_bench.py batched --out runs/hyper
    python benchmarks/hyper_bench.py front --preset small --size 128 --device cuda --out runs/hyper   # a GPU
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from weightzoo.data.slices import Preprocessing, SliceSet, load_slices
from weightzoo.data.synth import make_phantom_dataset
from weightzoo.evaluate.summary import evaluate_slices
from weightzoo.hyper import HyperConfig, HyperUNet, train_fixed_scale, train_hyper_on_slices
from weightzoo.hyper.front import front_figure, latencies
from weightzoo.nets.functional_unet import unet_flops
from weightzoo.nets.unet import ArchSpec
from weightzoo.segmenter import NetSegmenter, resolve_device
from weightzoo.train.config import TrainConfig

FIXED = (0.25, 0.375, 0.5, 0.625, 0.75)
FRONT = tuple(sorted({round(float(v), 4) for v in np.linspace(0.25, 0.75, 11)} | set(FIXED)))
TASKS = ["cord", "gm"]


def header(args: argparse.Namespace) -> str:
    return (
        f"{datetime.date.today()} · {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"1 thread, {args.device} · phantoms {args.size} px, tasks {', '.join(TASKS)} · preset {args.preset}, {args.steps} steps, "
        f"Adam lr {args.lr:g}, batch 8 · seeds {args.seeds}"
    )


def clock(args: argparse.Namespace) -> float:
    """CPU seconds of this process on a CPU (robust to other jobs); synchronised wall seconds on a GPU."""
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        return time.perf_counter()
    return time.process_time()


def prep_of(args: argparse.Namespace) -> Preprocessing:
    return Preprocessing("zscore", (args.size, args.size), 2, 1)


def data(args: argparse.Namespace, tmp: Path, sites: int) -> tuple[SliceSet, SliceSet, SliceSet]:
    ds = make_phantom_dataset(
        tmp, sites=sites, subjects_per_site=args.subjects, size=args.size, n_slices=8, seed=0
    )
    return tuple(load_slices(ds, TASKS, split, prep=prep_of(args)) for split in ("train", "val", "test"))  # type: ignore[return-value]


def cfg_of(args: argparse.Namespace, seed: int, val_every: int) -> TrainConfig:
    return TrainConfig(
        tasks=TASKS, preset=args.preset, optimizer="adam", lr=args.lr, steps=args.steps, batch_size=8,
        seed=seed, device=args.device, val_every=val_every, checkpoint_every=args.steps,
        size=(args.size, args.size),
    )  # fmt: skip


def test_dice(net: torch.nn.Module, spec: ArchSpec, test: SliceSet, prep: Preprocessing) -> dict[str, float]:
    summ = evaluate_slices(NetSegmenter(net, spec, TASKS, prep), test, tasks=TASKS)
    return {t: float(summ["mean"][t]["Dice"]) for t in TASKS}


class Store:
    """Finished runs by key in one JSON file, written atomically after each run (resumable)."""

    def __init__(self, path: Path):
        self.path = path
        self.runs: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}

    def get(self, key: str, make: Any) -> Any:
        if key not in self.runs:
            self.runs[key] = make()
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.runs, indent=1))
            tmp.replace(self.path)
        return self.runs[key]


def pm(v: list[float], scale: float = 1.0) -> str:
    v = [x * scale for x in v if not math.isnan(x)]
    return f"{np.mean(v):.3f} ± {np.std(v):.3f}" if v else "–"


def mean_task(d: dict[str, float]) -> float:
    return float(np.nanmean(list(d.values())))


# ---- front --------------------------------------------------------------------------------------------
def front(args: argparse.Namespace, store: Store, tmp: Path) -> str:
    train, _, test = data(args, tmp, 2)
    spec0 = ArchSpec.preset(args.preset, 1, len(TASKS))

    def hyper_run(seed: int) -> dict[str, Any]:
        t = clock(args)
        model, _ = train_hyper_on_slices(
            train, None, cfg_of(args, seed, args.steps), HyperConfig(condition="scale")
        )
        cpu = clock(args) - t
        return {
            "cpu": cpu,
            "dice": {
                str(p): test_dice(model.sample_network(p), model.sample_spec(p), test, prep_of(args))
                for p in FRONT
            },
        }

    def fixed_run(seed: int, phi: float) -> dict[str, Any]:
        t = clock(args)
        net, spec, _ = train_fixed_scale(train, None, cfg_of(args, seed, args.steps), phi)
        return {"cpu": clock(args) - t, "dice": test_dice(net, spec, test, prep_of(args))}

    warm = dataclasses.replace(cfg_of(args, 0, 5), steps=5)  # first calls pay one-time costs: not timed
    train_hyper_on_slices(train, None, warm, HyperConfig(condition="scale"))
    train_fixed_scale(train, None, warm, 0.5)
    hyper, fixed = {}, {}
    for seed in args.seeds:
        hyper[seed] = store.get(f"hyper/{seed}", lambda s=seed: hyper_run(s))
        print(f"front seed {seed}: hypernetwork {hyper[seed]['cpu']:.0f} CPU s", flush=True)
        for phi in FIXED:
            fixed[(seed, phi)] = store.get(f"fixed/{seed}/{phi}", lambda s=seed, p=phi: fixed_run(s, p))
            print(f"front seed {seed}: fixed φ={phi} {fixed[(seed, phi)]['cpu']:.0f} CPU s", flush=True)
    # latency of each φ's network (same architecture for hypernetwork samples and fixed networks)
    model = HyperUNet(spec0, HyperConfig(condition="scale"))
    lat = latencies(
        [model.sample_network(p) for p in FRONT],
        (1, args.size, args.size),
        resolve_device(args.device),
        repeats=30,
    )
    flops = {
        p: unet_flops(spec0.arch_kwargs, 1, len(TASKS), (args.size, args.size), "scale", p) for p in FRONT
    }
    rows, lines = (
        [],
        [
            f"| φ | GFLOPs | {args.device} latency ms | hypernetwork Dice (cord, gm mean) | fixed-φ network Dice | hyper − fixed (points) |",
            "|---:|---:|---:|---:|---:|---:|",
        ],
    )
    for p, ms in zip(FRONT, lat, strict=True):
        h = [mean_task(hyper[s]["dice"][str(p)]) for s in args.seeds]
        f = [mean_task(fixed[(s, p)]["dice"]) for s in args.seeds] if p in FIXED else []
        diff = f"{100 * (np.mean(h) - np.mean(f)):+.1f}" if f else ""
        lines.append(
            f"| {p:g} | {flops[p] / 1e9:.3f} | {1000 * ms:.2f} | {pm(h)} | {pm(f) if f else ''} | {diff} |"
        )
        rows.append(
            {"scale": p, "flops": flops[p], "latency_ms": 1000 * ms, "dice": {"mean": float(np.mean(h))}}
        )
    per_task = ["", "| φ | task | hypernetwork | fixed | hyper − fixed |", "|---:|---|---:|---:|---:|"]
    for p in FIXED:
        for t in TASKS:
            h = [hyper[s]["dice"][str(p)][t] for s in args.seeds]
            f = [fixed[(s, p)]["dice"][t] for s in args.seeds]
            per_task.append(f"| {p:g} | {t} | {pm(h)} | {pm(f)} | {100 * (np.mean(h) - np.mean(f)):+.1f} |")
    base = [
        {
            "flops": flops[p],
            "latency_ms": 1000 * lat[FRONT.index(p)],
            "dice": {"mean": float(np.mean([mean_task(fixed[(s, p)]["dice"]) for s in args.seeds]))},
        }
        for p in FIXED
    ]
    fig = front_figure(
        rows,
        args.figures / "hyper_front.png",
        "one scale hypernetwork vs fixed-φ networks (test Dice, mean of cord and gm)",
        base,
    )
    h_cpu = [hyper[s]["cpu"] for s in args.seeds]
    f_cpu = [fixed[(s, p)]["cpu"] for s in args.seeds for p in FIXED]
    f_half = [fixed[(s, 0.5)]["cpu"] for s in args.seeds]
    within = sum(
        np.mean([mean_task(hyper[s]["dice"][str(p)]) for s in args.seeds])
        >= np.mean([mean_task(fixed[(s, p)]["dice"]) for s in args.seeds]) - 0.005
        for p in FIXED
    )
    cost = (
        f"Training seconds ({'CPU' if args.device == 'cpu' else 'wall'}): hypernetwork {np.mean(h_cpu):.0f} ± {np.std(h_cpu):.0f}; one fixed-φ network "
        f"{np.mean(f_cpu):.0f} (mean over the 5 φ; φ=0.5: {np.mean(f_half):.0f}) → hypernetwork / fixed = "
        f"**{np.mean(h_cpu) / np.mean(f_cpu):.2f}×** (vs φ=0.5: {np.mean(h_cpu) / np.mean(f_half):.2f}×); the 5 fixed "
        f"networks together: {5 * np.mean(f_cpu):.0f} s. Goal ≤ 1.5×.\n\nHypernetwork within 0.5 Dice points of, or "
        f"above, the fixed-φ network at **{within} of {len(FIXED)}** φ values (goal: all)."
    )
    test_subjects = len({m["subject"] for m in test.meta})
    return "\n".join(
        [
            f"#### Scale-space front ({test_subjects} test subjects, 2 sites; figure {fig.name})",
            "",
            *lines,
            *per_task,
            "",
            cost,
        ]
    )


# ---- mip ----------------------------------------------------------------------------------------------
def spikes(losses: list[float], window: int = 20, factor: float = 2.0) -> int:
    return sum(
        1
        for i in range(window, len(losses))
        if not math.isfinite(losses[i]) or losses[i] > factor * statistics.median(losses[i - window : i])
    )


def mip(args: argparse.Namespace, store: Store, tmp: Path) -> str:
    train, val, _ = data(args, tmp, 4)

    def run(condition: str, use_mip: bool, seed: int) -> dict[str, Any]:
        hcfg = HyperConfig(
            condition=condition, mip=use_mip, sites=train.sites() if condition == "site" else []
        )
        losses: list[float] = []
        _, res = train_hyper_on_slices(train, val, cfg_of(args, seed, 10), hcfg, step_losses=losses)
        curve = [(e["step"], mean_task(e["val_dice"])) for e in res.history]
        return {"curve": curve, "losses": losses}

    lines = [
        "| condition | parametrization | final val Dice | steps to the default's final val Dice | loss spikes per run |",
        "|---|---|---:|---:|---:|",
    ]
    curves: dict[str, Any] = {}
    for condition in args.conditions:
        runs = {
            (m, s): store.get(f"{condition}/{m}/{s}", lambda c=condition, m=m, s=s: run(c, m, s))
            for m in (True, False)
            for s in args.seeds
        }
        print(f"mip: {condition} done", flush=True)
        for m in (True, False):
            finals = [runs[(m, s)]["curve"][-1][1] for s in args.seeds]
            reach = []
            for s in args.seeds:
                target = runs[(False, s)]["curve"][-1][1]
                hit = [step for step, d in runs[(m, s)]["curve"] if d >= target]
                reach.append(hit[0] if hit else math.nan)
            spk = [spikes(runs[(m, s)]["losses"]) for s in args.seeds]
            reached = [r for r in reach if not math.isnan(r)]
            reach_txt = (
                f"{np.mean(reached):.0f} ({', '.join('–' if math.isnan(r) else f'{r:.0f}' for r in reach)})"
                if reached
                else "never"
            )
            lines.append(
                f"| {condition} | {'MIP' if m else 'default'} | {pm(finals)} | {reach_txt} of {args.steps} | {np.mean(spk):.1f} ({', '.join(map(str, spk))}) |"
            )
            curves[f"{condition} {'MIP' if m else 'default'}"] = np.array(
                [[d for _, d in runs[(m, s)]["curve"]] for s in args.seeds]
            )
        curves[f"{condition} steps"] = [st for st, _ in runs[(True, args.seeds[0])]["curve"]]
    fig = mip_figure(curves, args.figures / "hyper_mip.png")
    return "\n".join(
        [
            f"#### MIP vs default parametrization (4 sites; val Dice every 10 steps; figure {fig.name})",
            "",
            *lines,
        ]
    )


def mip_figure(curves: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conditions = [c for c in ("scale", "site") if f"{c} steps" in curves]
    fig, axes = plt.subplots(1, len(conditions), figsize=(4.5 * len(conditions), 3.4), squeeze=False)
    for ax, condition in zip(axes[0], conditions, strict=True):
        steps = curves[f"{condition} steps"]
        for name in ("MIP", "default"):
            c = curves[f"{condition} {name}"]
            ax.plot(steps, c.mean(0), label=name)
            ax.fill_between(steps, c.min(0), c.max(0), alpha=0.2)
        ax.set_title(f"{condition} condition", fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("val Dice (mean of tasks)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---- batched ------------------------------------------------------------------------------------------
def time_conditions(model: HyperUNet, x: torch.Tensor, repeats: int) -> dict[str, float]:
    """Median ms of forward + backward on x [64, ...]: one site for all, 64 sites, a loop of 64 calls."""
    same, distinct = torch.full((len(x),), 5), torch.arange(1, len(x) + 1)

    def one(cond: torch.Tensor) -> None:
        model.zero_grad()
        model(x, cond).mean().backward()

    def loop() -> None:
        model.zero_grad()
        for i in range(len(x)):
            model(x[i : i + 1], int(distinct[i])).mean().backward()

    fns = {"same": lambda: one(same), "distinct": lambda: one(distinct), "loop": loop}
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        fn()  # warm-up
    for _ in range(repeats):  # interleaved: a slower moment hits all three
        for k, fn in fns.items():
            t = time.process_time()
            fn()
            times[k].append(time.process_time() - t)
    return {k: 1000 * statistics.median(v) for k, v in times.items()}


def batched(args: argparse.Namespace) -> str:
    lines = [
        "| preset | one condition ×64 (ms) | 64 different (grouped convs, ms) | ratio | loop of 64 single calls (ms) | ratio |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for preset in ("tiny", "small"):
        model = HyperUNet(
            ArchSpec.preset(preset, 1, 1), HyperConfig(condition="site", sites=[f"s{i}" for i in range(64)])
        )
        med = time_conditions(model, torch.randn(64, 1, 64, 64), args.repeats)
        lines.append(
            f"| {preset} | {med['same']:.0f} | {med['distinct']:.0f} | **{med['distinct'] / med['same']:.2f}×** | "
            f"{med['loop']:.0f} | {med['loop'] / med['same']:.2f}× |"
        )
        print(lines[-1], flush=True)
    return "\n".join(
        [
            f"#### Batched conditions (forward + backward, batch 64 at 64 px, median of {args.repeats}; goal ≤ 2×)",
            "",
            *lines,
        ]
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("part", choices=["front", "mip", "batched"])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--subjects", type=int, default=16, help="phantom subjects per site (split by subject)")
    ap.add_argument("--repeats", type=int, default=10, help="batched: timed repeats")
    ap.add_argument(
        "--conditions", nargs="+", default=["scale", "site"], choices=["scale", "site"], help="mip: which"
    )
    ap.add_argument("--size", type=int, default=64, help="phantom and network input size (px)")
    ap.add_argument("--device", default="cpu", help="cpu | cuda (front: training, Dice and latency)")
    ap.add_argument("--out", type=Path, default=Path("runs/hyper_bench"))
    ap.add_argument("--figures", type=Path, default=Path("docs/figures"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        if args.part == "batched":
            text = batched(args)
        else:
            where = "" if (args.size, args.device) == (64, "cpu") else f"_{args.size}px_{args.device}"
            store = Store(args.out / f"{args.part}_{args.preset}_{args.steps}{where}.json")
            text = (front if args.part == "front" else mip)(args, store, Path(tmp))
    text = f"{header(args)} · {time.perf_counter() - t0:.0f} s wall\n\n{text}"
    (args.out / f"{args.part}.md").write_text(text + "\n")
    print("\n" + text)


if __name__ == "__main__":
    main()
