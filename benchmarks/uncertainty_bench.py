"""Issue 13: uncertainty sources side by side — deterministic vs MC dropout (T = 5, 10, 20, 50) vs an
ensemble of 3 independently trained networks vs TTA (8 flips/rotations) vs in-context candidates (8).

    python benchmarks/uncertainty_bench.py WORK_DIR [--shared ../shared/data] [--models 5] [--steps 600]

Phantoms (3 sites, 24 subjects each, 64 px, 3 extra raters per case: GED is measurable) and, when the
shared data is there, WBC (2 sources) and CHASE_DB1 retinal vessels (one site, TWO real observers: 128 px
crops at full resolution; 3 networks of 300 steps, and MC dropout at T = 20 only, to fit the CPU). Five `small` networks with spatial dropout 0.1 (nnU-Net's
dropout_op), tasks cord + gm (WBC: nucleus + cell), trained on ONE site (A / Dataset1) with seeds 0–4.
Per seed s = 0, 1, 2: the deterministic network s (dropout off), MC dropout of network s (sampling seed
s), TTA of network s, the ensemble of networks {s, s+1, s+2}, and in-context candidates from 16
labelled training slices of the training site (support drawn with seed s). Scored on the test split,
at the training site and at the unseen sites, per task; numbers are means over tasks of per-case
means, then mean ± sd over the 3 seeds. Writes WORK/results.json, WORK/table.md and reliability
diagrams (WORK/reliability_*.png). Resumable: finished models and result cells are reused.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from weightzoo.data.raw import RawDataset
from weightzoo.data.slices import load_slices
from weightzoo.fileio import atomic_write_json
from weightzoo.segmenter import load_model
from weightzoo.train.config import TrainConfig
from weightzoo.train.loop import train_model
from weightzoo.uncertainty.evaluate import evaluate_uncertainty
from weightzoo.uncertainty.report import reliability_figure
from weightzoo.uncertainty.sources import TTA, Ensemble, InContextCandidates, MCDropout

SEEDS = (0, 1, 2)
COLUMNS = ("dice", "ece", "ece_band", "brier", "auroc", "ueo", "ged", "ged_mean_only", "best_dice")


@dataclass
class Setting:
    """One dataset of the bench and how its networks are trained."""

    name: str
    ds: RawDataset
    tasks: list[str]
    site: str  # the training site
    norm: str
    size: int = 64
    steps: int = 600
    n_models: int = 5
    mc: tuple[int, ...] = (5, 10, 20, 50)


def datasets(work: Path, shared: Path, steps: int, n_models: int) -> list[Setting]:
    """Every dataset of the bench (those under `shared` only when present)."""
    from weightzoo.data.import_raters import import_chasedb1
    from weightzoo.data.importers import import_wbc
    from weightzoo.data.synth import make_phantom_dataset

    ph = sorted((work / "phantom").glob("Dataset*"))
    ds = (
        RawDataset.open(ph[0])
        if ph
        else make_phantom_dataset(work / "phantom", 3, 24, 64, 8, seed=0, raters=3)
    )
    out = [Setting("phantoms", ds, ["cord", "gm"], "A", "zscore", 64, steps, n_models)]
    if (shared / "wbc").is_dir():
        wbc = sorted((work / "wbc").glob("Dataset*"))
        ds = RawDataset.open(wbc[0]) if wbc else import_wbc(shared / "wbc", work / "wbc", size=128)
        out.append(Setting("WBC", ds, ["nucleus", "cell"], "Dataset1", "rgb", 64, steps, n_models))
    else:
        print(f"# WBC skipped: {shared / 'wbc'} not found", file=sys.stderr)
    if (shared / "chasedb1").is_dir():  # real multi-rater data: two observers; one site
        ch = sorted((work / "chasedb1").glob("Dataset*"))
        ds = (
            RawDataset.open(ch[0])
            if ch
            else import_chasedb1(shared / "chasedb1", work / "chasedb1", tile=128)
        )
        # 128 px crops at full resolution (thin vessels); fewer, shorter runs and only T = 20: 4x the pixels
        out.append(Setting("CHASE_DB1", ds, ["vessel"], "chase", "rgb", 128, 300, 3, (20,)))
    else:
        print(f"# CHASE_DB1 skipped: {shared / 'chasedb1'} not found", file=sys.stderr)
    return out


def models(work: Path, st: Setting) -> list[Any]:
    segs = []
    for seed in range(st.n_models):
        cfg = TrainConfig(tasks=st.tasks, preset="small", steps=st.steps, batch_size=16, seed=seed, dropout=0.1,
                          size=(st.size, st.size), normalization=st.norm, device="cpu")  # fmt: skip
        res = train_model(
            st.ds, cfg, work / "models" / st.name / f"seed{seed}", sites=[st.site], progress=False
        )
        segs.append(load_model(res.out_dir, "cpu"))
    return segs


def sources(
    segs: list[Any], seed: int, support: tuple[np.ndarray, np.ndarray], mc: tuple[int, ...]
) -> dict[str, Any]:
    seg = segs[seed]
    out: dict[str, Any] = {"deterministic": Ensemble([seg])}
    for t in mc:
        out[f"MC dropout T={t}"] = MCDropout(seg, t, seed)
    out["TTA ×8"] = TTA(seg, 8)
    out["ensemble of 3"] = Ensemble([segs[(seed + i) % len(segs)] for i in range(3)])
    out["in-context ×8"] = support  # built per task below (one support set per task)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("work", type=Path)
    ap.add_argument(
        "--shared", type=Path, default=Path(__file__).resolve().parents[1].parent / "shared" / "data"
    )
    ap.add_argument("--models", type=int, default=5)
    ap.add_argument("--steps", type=int, default=600)
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    work = args.work
    cells_path = work / "cells.json"
    cells: dict[str, Any] = json.loads(cells_path.read_text()) if cells_path.exists() else {}
    t0 = time.perf_counter()
    for st in datasets(work, args.shared, args.steps, args.models):
        name, ds, tasks, site = st.name, st.ds, st.tasks, st.site
        segs = models(work, st)
        unseen = [s for s in ds.sites() if s != site]
        train = load_slices(ds, tasks, "train", [site], prep=segs[0].preprocessing)
        groups = [("training site", [site])] + ([("unseen sites", unseen)] if unseen else [])
        for seed in SEEDS:
            for label, source in sources(segs, seed, (train.images, train.labels), st.mc).items():
                for where, sites in groups:
                    key = f"{name}|{label}|{where}|{seed}"
                    if key in cells:
                        continue
                    per_task = {}
                    for j, task in enumerate(tasks):
                        if label.startswith("in-context"):
                            rng = np.random.default_rng(seed)
                            fg = np.flatnonzero(train.labels[:, j].reshape(len(train), -1).any(1))
                            pick = rng.choice(fg, 16, replace=False)
                            src = InContextCandidates(
                                train.images[pick].mean(1), train.labels[pick, j], 8, seed=seed
                            )
                            seg = SimpleNamespace(tasks=[task], preprocessing=segs[0].preprocessing)
                        else:
                            src, seg = source, segs[seed]
                        res = evaluate_uncertainty(seg, src, ds, "test", sites, [task])
                        per_task[task] = {**res["mean"][task], "s_per_image": res["seconds_per_image"],
                                          "reliability": res["reliability"][task]}  # fmt: skip
                    cells[key] = per_task
                    atomic_write_json(cells_path, cells)
                    print(
                        f"{key}: "
                        + ", ".join(
                            f"{t} Dice {m['dice']:.3f} ECE {m['ece']:.4f} AUROC {m['auroc']:.3f}"
                            for t, m in per_task.items()
                        ),
                        flush=True,
                    )
    rows = table(cells)
    (work / "table.md").write_text(rows)
    figures(cells, work)
    atomic_write_json(
        work / "results.json", {"cells": cells, "device": device(), "date": time.strftime("%Y-%m-%d")}
    )
    print(f"# {time.strftime('%Y-%m-%d')} · {device()} · {time.perf_counter() - t0:.0f} s")
    print(rows)


def device() -> str:
    return f"{platform.machine()} CPU, {torch.get_num_threads()} torch threads, torch {torch.__version__}"


def _mean_sd(values: list[float], digits: int = 3) -> str:
    v = [x for x in values if x is not None and np.isfinite(x)]
    if not v:
        return "–"
    m = f"{statistics.fmean(v):.{digits}f}"
    return f"{m} ± {statistics.stdev(v):.{digits}f}" if len(v) > 1 else m


def _column(runs: list[dict[str, Any]], key: str) -> str:
    """Mean over tasks per seed, then mean ± sd over seeds."""
    per_seed = []
    for r in runs:
        vals = [m[key] for m in r.values() if m.get(key) is not None and np.isfinite(m[key])]
        per_seed.append(statistics.fmean(vals) if vals else np.nan)
    return _mean_sd(per_seed, 4 if key in ("ece", "brier", "s_per_image") else 3)


def table(cells: dict[str, Any]) -> str:
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for key, per_task in cells.items():
        name, label, where, _ = key.split("|")
        groups.setdefault((name, where, label), []).append(per_task)
    head = ["data", "test sites", "source", "Dice", "ECE", "ECE boundary band", "Brier", "AUROC", "UEO",
            "GED (set)", "GED (mean only)", "best-candidate Dice", "s / slice"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (name, where, label), runs in groups.items():
        cells_ = [name, where, label] + [_column(runs, k) for k in (*COLUMNS, "s_per_image")]
        lines.append("| " + " | ".join(cells_) + " |")
    return "\n".join(lines) + "\n"


def figures(cells: dict[str, Any], work: Path) -> None:
    """A reliability diagram per dataset: unseen sites where there are some, else the training site."""
    for name in sorted({k.split("|")[0] for k in cells}):
        where = "unseen sites" if f"{name}|deterministic|unseen sites|0" in cells else "training site"
        curves = {}
        for label in ("deterministic", "MC dropout T=20", "ensemble of 3", "TTA ×8"):
            key = f"{name}|{label}|{where}|0"
            if key in cells:
                curves[label] = next(iter(cells[key].values()))["reliability"]
        if curves:
            task = next(iter(cells[f"{name}|deterministic|{where}|0"]))
            fig = reliability_figure(curves, f"{name}, {task}, {where} (seed 0)")
            fig.savefig(work / f"reliability_{name}.png", dpi=100, bbox_inches="tight")


if __name__ == "__main__":
    main()
