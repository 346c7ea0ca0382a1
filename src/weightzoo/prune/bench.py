"""`prune bench`: every method × target × seed, one shared fine-tuning budget, ShrinkBench's metrics.

Cells (method, target, seed) are independent and resumable: each writes `cells/<cell>.json`
atomically when done, and its fine-tune (a model folder under `runs/`) resumes from its checkpoint
after a kill. Results are scored on the dataset's TEST split of the model's sites (never used to choose
anything here). Two controls sit in every table: the unpruned network, and the unpruned network given
the same fine-tuning budget (`global-magnitude` at ratio 1, which removes nothing), so a gain from
fine-tuning alone is not read as a gain from pruning.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from weightzoo.data.slices import SliceSet
from weightzoo.evaluate.summary import evaluate_slices
from weightzoo.fileio import atomic_write_json, read_json
from weightzoo.prune.model import PruneRecipe, prune_and_finetune, prune_network
from weightzoo.prune.structured import CHANNEL_STRATEGIES
from weightzoo.segmenter import NetSegmenter

CONTROL = "unpruned+finetune"


def test_scores(seg: Any, test: SliceSet) -> dict[str, float]:
    """Mean test Dice and HD95 (pixels of the preprocessed grid) over the model's tasks."""
    summary = evaluate_slices(seg, test)
    mean = summary["mean"]

    def avg(metric: str) -> float:
        vals = [mean[t].get(metric) for t in summary["tasks"]]
        vals = [v for v in vals if v is not None and math.isfinite(v)]
        return statistics.fmean(vals) if vals else math.nan

    return {"dice": avg("Dice"), "hd95": avg("HD95")}


def cell_name(method: str, target: float, seed: int) -> str:
    return f"{method}_{target:g}_s{seed}"


def plan_cells(
    methods: Sequence[str], ratios: Sequence[float], speedups: Sequence[float], seeds: int
) -> list[tuple[str, float, int]]:
    """(method, target, seed) for every cell, plus the fine-tuned unpruned control per seed."""
    cells = [("global-magnitude", 1.0, s) for s in range(seeds)]  # the control
    for m in methods:
        for t in speedups if m in CHANNEL_STRATEGIES else ratios:
            cells += [(m, float(t), s) for s in range(seeds)]
    return cells


def run_cell(
    seg: NetSegmenter,
    method: str,
    target: float,
    seed: int,
    base: PruneRecipe,
    train: SliceSet,
    val: SliceSet | None,
    test: SliceSet,
    out: Path,
    device: str = "auto",
) -> dict[str, Any]:
    """Prune, score before fine-tuning, fine-tune, score again; cached in cells/<cell>.json."""
    name = cell_name(method, target, seed)
    path = out / "cells" / f"{name}.json"
    if path.exists():
        return read_json(path, "prune bench cell")
    structured = method in CHANNEL_STRATEGIES
    recipe = PruneRecipe(
        **{
            **base.to_dict(),
            "method": method,
            "seed": seed,
            "ratio": None if structured else target,
            "speedup": target if structured else None,
        }
    )
    spec, pruned = prune_network(seg, recipe, train)
    before = test_scores(NetSegmenter(pruned, spec, seg.tasks, seg.preprocessing), test)
    tuned, info = prune_and_finetune(
        seg, recipe, out / "runs" / name, train, val, device, progress=False, pruned=(spec, pruned)
    )
    after = test_scores(tuned, test)
    cell = {
        "cell": name,
        "method": CONTROL if (method, target) == ("global-magnitude", 1.0) else method,
        "target": target,
        "seed": seed,
        "dice_before_finetune": before["dice"],
        "dice": after["dice"],
        "hd95": after["hd95"],
        **{
            k: info["pruned"][k]
            for k in ("compression", "theoretical_speedup", "latency_s", "measured_speedup")
        },
        "original": info["original"],
        "n_params": int(tuned.n_params),
    }
    atomic_write_json(path, cell)
    return cell


def run_bench(
    seg: NetSegmenter,
    cells: list[tuple[str, float, int]],
    base: PruneRecipe,
    train: SliceSet,
    val: SliceSet | None,
    test: SliceSet,
    out: str | Path,
    device: str = "auto",
    on_cell: Callable[[int, int, str], None] | None = None,
) -> dict[str, Any]:
    """Run (or resume) every cell; write results.json with the unpruned reference and all cells."""
    out = Path(out)
    (out / "cells").mkdir(parents=True, exist_ok=True)
    reference = test_scores(seg, test)
    results = []
    for i, (m, t, s) in enumerate(cells):
        results.append(run_cell(seg, m, t, s, base, train, val, test, out, device))
        if on_cell is not None:
            on_cell(i + 1, len(cells), cell_name(m, t, s))
    summary = {
        "format": "weightzoo-prune-bench",
        "version": 1,
        "model": seg.name,
        "unpruned": {**reference, **{k: results[0]["original"][k] for k in ("size", "flops", "latency_s")}},
        "recipe": base.to_dict(),
        "cells": results,
        "rows": aggregate(results),
    }
    atomic_write_json(out / "results.json", summary)
    return summary


def aggregate(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (method, target): mean and sd over seeds of every number."""
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for c in cells:
        groups.setdefault((c["method"], c["target"]), []).append(c)
    rows = []
    for (m, t), cs in groups.items():
        row: dict[str, Any] = {"method": m, "target": t, "seeds": len(cs)}
        for k in (
            "dice_before_finetune",
            "dice",
            "hd95",
            "compression",
            "theoretical_speedup",
            "measured_speedup",
        ):
            vals = [c[k] for c in cs if c[k] is not None and math.isfinite(c[k])]
            row[k] = statistics.fmean(vals) if vals else math.nan
            row[f"{k}_sd"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
        rows.append(row)
    return rows
