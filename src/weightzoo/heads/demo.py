"""The site-heads part of `weightzoo demo`: one backbone on all sites, a head per site, and a small
universal-vs-heads table in the demo report. Sized to a time budget (~40 s on 2 CPU cores).

The lead's demo calls `demo_heads(out_dir, ds, report, log, seconds_budget)` with the demo's phantom
dataset; the heads folder it writes (`out_dir/heads`) is a real one: `weightzoo heads ls` reads it.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from weightzoo.data.raw import RawDataset
from weightzoo.data.slices import Preprocessing, load_slices
from weightzoo.evaluate.summary import evaluate_segmenter
from weightzoo.heads.model import UNIVERSAL, HeadedModel, is_heads_folder, read_heads_json
from weightzoo.heads.segmenter import HeadedSegmenter, evaluate_headed
from weightzoo.heads.train import train_backbone, train_heads
from weightzoo.train.config import TrainConfig

DEMO_TASKS = ("cord", "gm")


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Tiny nets run fastest on one thread, and far faster on a machine shared with other jobs."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _config(steps: int, tasks: list[str], size: tuple[int, int]) -> TrainConfig:
    return TrainConfig(
        tasks=tasks, preset="tiny", optimizer="adam", lr=1e-2, steps=steps, batch_size=8, size=size,
        val_every=max(1, steps), checkpoint_every=max(1, steps // 4), device="cpu",
    )  # fmt: skip


def _seconds_per_step(ds: RawDataset, tasks: list[str], size: tuple[int, int]) -> float:
    """Seconds per backbone step, timed over 4 steps after a 1-step warm-up."""
    train = load_slices(ds, tasks, "train", prep=Preprocessing(size=size, channels=ds.n_channels))
    train_backbone(train, None, _config(1, tasks, size), 0)
    _, res = train_backbone(train, None, _config(4, tasks, size), 0)
    return res.seconds / 4


def demo_heads(
    out_dir: str | Path,
    ds: RawDataset,
    report: Any,
    log: Callable[[str], None] = print,
    seconds_budget: float = 40.0,
) -> dict[str, Any]:
    """Train backbone + universal head + one head (n = 1) per site into `out_dir/heads`, evaluate
    universal vs site heads on every site's test subjects, and add a table to `report`
    (a `weightzoo.evaluate.report.Report`). Returns {"steps", "head_steps", "seconds", "rows"}.

    Steps are sized from a timing of a few steps so the whole call takes about `seconds_budget`;
    an existing `out_dir/heads` from an earlier run is reused (its steps are kept, nothing retrains).
    """
    t0 = time.perf_counter()
    folder = Path(out_dir) / "heads"
    tasks = [t for t in DEMO_TASKS if t in ds.tasks] or list(ds.tasks)[:1]
    size = (64, 64)
    with _one_thread():
        if is_heads_folder(folder):
            steps = int(read_heads_json(folder)["info"]["config"]["steps"])
        else:
            per_step = _seconds_per_step(ds, tasks, size)
            # backbone + 4 heads at steps/10 (~0.7 of a backbone step each) + evaluation (~25 %)
            n_sites = len(ds.sites())
            budget = max(0.0, seconds_budget - (time.perf_counter() - t0))  # 0: the minimum, 40 steps
            steps = int(budget / 1.25 / (per_step * (1 + 0.07 * n_sites)))
            steps = max(40, min(400, steps))
        cfg = _config(steps, tasks, size)
        log(f"site heads: backbone {steps} steps on sites {', '.join(ds.sites())}, then one head per site")
        res = train_heads(ds, cfg, folder, head_stages=1, head_steps=max(1, steps // 10), log=log)
        hm = res.model or HeadedModel.load(folder)
        universal = evaluate_segmenter(HeadedSegmenter(hm, None), ds, split="test")
        heads = evaluate_headed(hm, ds, split="test", device="cpu")
    rows = []
    for site in sorted(heads["per_site"]):
        for t in tasks:
            u = universal["per_site"][site][t]["Dice"]
            h = heads["per_site"][site][t]["Dice"]
            rows.append(
                {
                    "site": site,
                    "task": t,
                    "universal Dice": u,
                    "site head Dice": h,
                    "gain (points)": 100 * (h - u) if not (math.isnan(u) or math.isnan(h)) else math.nan,
                    "test subjects": heads["per_site_n_cases"][site],
                }
            )
    seconds = time.perf_counter() - t0
    report.section(
        "Site heads: one backbone, a small head per site",
        f"A tiny PlainConvUNet ({steps} steps, Adam, all sites, site-balanced batches) gives the universal "
        f"model; each site then gets its own head (last decoder stage + segmentation layer, "
        f"{hm.head_n_params(UNIVERSAL):,} of the network's "
        f"{sum(v.numel() for v in hm.backbone.values()) + hm.head_n_params(UNIVERSAL):,} parameters) fine-tuned "
        f"for {max(1, steps // 10)} steps with the backbone frozen. Test-subject Dice per site, one seed: "
        f"see docs/benchmarks.md for seeds and spread. Model folder: {folder} (try `weightzoo heads ls`).",
    )
    report.table(rows, caption=f"Universal model vs site heads (test subjects; {seconds:.0f} s)")
    log(f"site heads: done in {seconds:.0f}s")
    return {"steps": steps, "head_steps": max(1, steps // 10), "seconds": round(seconds, 1), "rows": rows}
