"""The zoo part of `weightzoo demo`: a small zoo built on the CPU within a time budget, and its report.

3 tasks x 2 sites x 3 seeds = 18 runs of the tiny preset (Adam, lr 1e-2, augmentation 0.3), each saving its initialisation, 10 random
checkpoints and its final state (216 checkpoints). The number of steps is sized from a timing of one
training step on this machine, so the build takes about `seconds_budget`. The report gets the best
checkpoint per task (by validation Dice; the test split is never used) and validation Dice over
training for every run.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from weightzoo.data.raw import RawDataset
from weightzoo.evaluate.report import Report

DEMO_TASKS = ("cord", "gm", "canal")
PRESET, BATCH, SEEDS, CHECKPOINTS = "tiny", 8, 3, 10
SIZE = 64


def demo_grid(
    ds: RawDataset,
    seconds_budget: float,
    log: Callable[[str], None] = print,
    seeds: int = SEEDS,
    checkpoints: int = CHECKPOINTS,
    min_steps: int = 40,
) -> dict[str, Any]:
    """The demo's grid, with `steps` sized so that the build takes about `seconds_budget`."""
    from weightzoo.nets.unet import ArchSpec
    from weightzoo.zoo.batched import measure_modes

    tasks = [t for t in DEMO_TASKS if t in ds.tasks] or list(ds.tasks)[:3]
    sites = ds.sites()[:2]
    n_runs = len(tasks) * len(sites) * seeds
    t_step, _ = measure_modes(
        ArchSpec.preset(PRESET, ds.n_channels, 1), BATCH, (SIZE, SIZE), 1, torch.device("cpu")
    )
    # each saved checkpoint costs about 3 steps (forward passes over 64 training + the validation slices)
    # the build measured about twice the bare step time per step (augmentation, batching, evaluation)
    steps = (0.5 * seconds_budget / (n_runs * t_step)) - 3 * (checkpoints + 2)
    steps = int(min(300, max(min_steps, steps)))
    log(f"zoo demo: {n_runs} runs x {steps} steps ({t_step * 1e3:.0f} ms per step measured)")
    return {
        "tasks": tasks,
        "sites": [[s] for s in sites],
        "seeds": seeds,
        "preset": PRESET,
        "steps": steps,
        "batch_size": BATCH,
        "checkpoints": checkpoints,
        "size": SIZE,
        # Adam at 1e-2 gets the tiny net to cord Dice ~0.95 in ~100 steps; nnU-Net's SGD needs far more
        "optimizer": "adam",
        "lr": 0.01,
        "augment": 0.3,
    }


def demo_zoo(
    out_dir: str | Path,
    ds: RawDataset,
    report: Report,
    log: Callable[[str], None] = print,
    seconds_budget: float = 60.0,
    seeds: int = SEEDS,
    checkpoints: int = CHECKPOINTS,
    min_steps: int = 40,
) -> dict[str, Any]:
    """Build the demo zoo in `out_dir/zoo` (resumes/skips when re-run) and add a section to `report`.
    seeds, checkpoints, min_steps: smaller demos (tests).

    Returns {zoo, runs, checkpoints, seconds, disk_bytes, verify_ok, best: {task: {...}}}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from weightzoo.zoo.build import build_zoo
    from weightzoo.zoo.store import Zoo

    t0 = time.perf_counter()
    zoo_path = Path(out_dir) / "zoo"
    # One intra-op thread: the tiny network's ops are too small to gain from more, and on a busy
    # machine spinning OpenMP threads made each step ~10x slower (measured). Restored afterwards.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        grid = demo_grid(ds, seconds_budget, log, seeds, checkpoints, min_steps)
        res = build_zoo(ds, grid, zoo_path, device="cpu", progress=False, log=log)
    finally:
        torch.set_num_threads(threads)
    with Zoo(zoo_path) as z:
        summary, ok = z.summary(), z.verify().ok
        best: dict[str, dict[str, Any]] = {}
        rows = []
        for task in grid["tasks"]:
            top = z.checkpoints(task=task, order_by="-val_dice", limit=1)
            if not top or top[0].metric("val_dice", task) is None:
                continue
            c = top[0]
            best[task] = {
                "ckpt_id": c.ckpt_id,
                "site": "+".join(c.sites),
                "seed": c.seed,
                "step": c.step,
                "val_dice": c.metric("val_dice", task),
                "val_loss": c.metric("val_loss", task),
            }
            rows.append(
                {
                    "task": task,
                    "best checkpoint": c.ckpt_id,
                    "site": "+".join(c.sites),
                    "seed": c.seed,
                    "step": f"{c.step} ({c.kind})",
                    "val Dice": best[task]["val_dice"],
                    "val loss": best[task]["val_loss"],
                    "runs": summary["tasks"][task]["runs"],
                }
            )
        curves = {r.run_id: (r, z.checkpoints(run_id=r.run_id)) for r in z.runs()}

    fig, axes = plt.subplots(1, len(grid["tasks"]), figsize=(4.2 * len(grid["tasks"]), 3.4), squeeze=False)
    colors = {s[0]: f"C{i}" for i, s in enumerate(grid["sites"])}
    for ax, task in zip(axes[0], grid["tasks"], strict=True):
        for run, cks in curves.values():
            if task not in run.tasks:
                continue
            pts = [
                (c.step, c.metric("val_dice", task)) for c in cks if c.metric("val_dice", task) is not None
            ]
            if pts:
                ax.plot(
                    *zip(*pts, strict=True), marker=".", lw=1, color=colors.get(run.sites[0], "k"), alpha=0.8
                )
        ax.set(title=task, xlabel="step", ylabel="validation Dice", ylim=(0, 1))
    for site, col in colors.items():
        axes[0][0].plot([], [], color=col, label=f"site {site}")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()

    report.section(
        "Checkpoint zoo",
        f"{summary['runs']} training runs ({', '.join(grid['tasks'])} × sites {', '.join(s[0] for s in grid['sites'])} "
        f"× {seeds} seeds, {PRESET} preset, {grid['steps']} steps) saved their initialisation, {checkpoints} checkpoints "
        f"at random iterations and their final state: {summary['checkpoints']} checkpoints, "
        f"{summary['data_bytes'] / 2**20:.1f} MB, each with train loss, validation loss and validation Dice per task "
        f"on the validation subjects of its site. Built in {res.seconds:.0f} s; `weightzoo zoo verify` "
        f"{'passes' if ok else 'FAILS'}.",
    )
    report.table(
        rows, caption="Best checkpoint per task (highest validation Dice over all runs and checkpoints)"
    )
    report.figure(
        fig, "zoo_val_dice", "Validation Dice over training, every run (one line per run, colour = site)."
    )
    plt.close(fig)
    return {
        "zoo": str(zoo_path),
        "runs": summary["runs"],
        "checkpoints": summary["checkpoints"],
        "steps": grid["steps"],
        "seconds": round(time.perf_counter() - t0, 1),
        "disk_bytes": summary["data_bytes"],
        "verify_ok": ok,
        "best": best,
        "modes": res.modes,
    }
