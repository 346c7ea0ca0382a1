"""The in-context part of `weightzoo demo`: segment a held-out phantom task from a few examples.

`demo_incontext(out_dir, report, log, seconds_budget)` generates a small phantom dataset, takes the
`canal` task at site D (both held out from the shipped model's training: a task and a contrast it
never saw), gives the shipped model 8 labelled slices of training subjects as support, segments the
test subjects' slices (no training), and adds a table and a figure to the demo report.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from weightzoo.evaluate.metrics import dice

TASK, SITE, N_SUPPORT = "canal", "D", 8


def _slices(ds: Any, split: str) -> tuple[list[np.ndarray], list[np.ndarray]]:
    from weightzoo.data.slices import load_case

    xs, ys = [], []
    for case in ds.cases_in(split, [SITE]):
        img, lab = load_case(ds, case)
        m = np.isin(lab, ds.task_labels(TASK))
        for z in range(m.shape[2]):
            if m[:, :, z].any():
                xs.append(img.array[0, :, :, z])
                ys.append(m[:, :, z])
    return xs, ys


def demo_incontext(
    out_dir: str | Path,
    report: Any | None = None,
    log: Callable[[str], None] = print,
    seconds_budget: float = 30.0,
) -> dict[str, Any]:
    """Run the in-context demo into out_dir; add a section to `report` (a weightzoo Report) if given.

    Returns {"task", "site", "n_support", "n_queries", "dice", "best_candidate_dice", "seconds", "figure"}.
    """
    from weightzoo import incontext
    from weightzoo.data.raw import RawDataset
    from weightzoo.data.synth import make_phantom_dataset

    t0 = time.perf_counter()
    out = Path(out_dir)
    data = out / "incontext_data"
    found = sorted(data.glob("Dataset*_InContextDemo")) if data.exists() else []
    ds = (
        RawDataset.open(found[0])
        if found
        else make_phantom_dataset(data, 4, 6, 64, 8, 777, name="InContextDemo")
    )
    sx, sy = _slices(ds, "train")
    qx, qy = _slices(ds, "test")
    rng = np.random.default_rng(0)
    pick = rng.choice(len(sx), min(N_SUPPORT, len(sx)), replace=False)
    sx, sy = [sx[i] for i in pick], [sy[i] for i in pick]
    n_q = len(qx) if seconds_budget >= 10 else min(len(qx), 4)
    qx, qy = qx[:n_q], qy[:n_q]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", incontext.InContextWarning)
        t1 = time.perf_counter()
        probs = incontext.segment_batch(qx, sx, sy, candidates=3)
        seg_s = time.perf_counter() - t1
    d1 = [dice(p[0] >= 0.5, y) for p, y in zip(probs, qy, strict=True)]
    best = [max(dice(c >= 0.5, y) for c in p) for p, y in zip(probs, qy, strict=True)]
    res = {
        "task": TASK,
        "site": SITE,
        "n_support": len(sx),
        "n_queries": len(qx),
        "dice": float(np.nanmean(d1)),
        "best_candidate_dice": float(np.nanmean(best)),
        "seconds_segment": round(seg_s, 2),
        "seconds": 0.0,
    }
    fig_path = None
    if report is not None:
        fig_path = _add_to_report(report, res, sx, sy, qx, qy, probs)
    res["figure"] = str(fig_path) if fig_path else None
    res["seconds"] = round(time.perf_counter() - t0, 2)
    log(
        f"in-context: {TASK} at site {SITE} (held out) from {len(sx)} examples, no training: "
        f"Dice {res['dice']:.3f} (best of 3 candidates {res['best_candidate_dice']:.3f}) on {len(qx)} slices "
        f"in {seg_s:.1f} s"
    )
    return res


def _add_to_report(
    report: Any,
    res: dict[str, Any],
    sx: list[np.ndarray],
    sy: list[np.ndarray],
    qx: list[np.ndarray],
    qy: list[np.ndarray],
    probs: list[np.ndarray],
) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    report.section(
        "In-context segmentation (no training)",
        f"The shipped in-context model segments the phantom '{TASK}' task at site {SITE}: a task and a contrast "
        f"held out from its training. The task is defined only by {res['n_support']} labelled slices of training "
        "subjects; the query slices come from the test subjects.",
    )
    report.table(
        [
            {
                "task (held out)": f"{TASK} @ site {SITE}",
                "support examples": res["n_support"],
                "query slices": res["n_queries"],
                "Dice (1 candidate)": res["dice"],
                "best of 3 candidates": res["best_candidate_dice"],
                "seconds": res["seconds_segment"],
            }
        ],
        caption="In-context Dice on held-out query slices (on the query's grid).",
    )
    n_s, n_q = min(3, len(sx)), min(4, len(qx))
    fig, axes = plt.subplots(1, n_s + n_q, figsize=(2.2 * (n_s + n_q), 2.5))
    for i in range(n_s):
        axes[i].imshow(sx[i].T, cmap="gray", origin="lower")
        axes[i].contour(sy[i].T, levels=[0.5], colors="lime", linewidths=1, origin="lower")
        axes[i].set_title(f"support {i + 1}", fontsize=8)
    for j in range(n_q):
        ax = axes[n_s + j]
        ax.imshow(qx[j].T, cmap="gray", origin="lower")
        ax.contour(qy[j].T, levels=[0.5], colors="lime", linewidths=1, origin="lower")
        if (probs[j][0] >= 0.5).any():
            ax.contour(probs[j][0].T, levels=[0.5], colors="red", linewidths=1, origin="lower")
        ax.set_title(f"query {j + 1}", fontsize=8)
    for ax in axes:
        ax.axis("off")
    return report.figure(
        fig,
        "incontext_demo",
        "Support examples (left, label green) and queries: reference (green), prediction (red).",
    )
