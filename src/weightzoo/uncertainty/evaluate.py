"""`evaluate --uncertainty`: per case and task, Dice of the mean prediction plus the calibration and
uncertainty–error metrics of weightzoo.uncertainty.metrics, on the preprocessed grid; means per task
and per site (nanmeans: a case without an error pixel has no AUROC/UEO; see the metrics module)."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from weightzoo.data.raw import RawDataset
from weightzoo.data.slices import load_slices
from weightzoo.evaluate.metrics import dice
from weightzoo.uncertainty.maps import uncertainty_maps
from weightzoo.uncertainty.metrics import BINS, best_candidate_dice, case_uncertainty_metrics, ged

UNCERTAINTY_MAP = "entropy"  # the map AUROC and UEO score (predictive entropy: works for every source)


def _nanmean(values: list[float]) -> float:
    v = [x for x in values if x is not None and math.isfinite(x)]
    return float(np.mean(v)) if v else math.nan


def evaluate_uncertainty(
    seg: Any,
    source: Any,
    ds: RawDataset,
    split: str = "test",
    sites: Sequence[str] | None = None,
    tasks: Sequence[str] | None = None,
) -> dict[str, Any]:
    """{"per_case": [...], "mean": {task: {metric: value}}, "per_site": {site: {task: {...}}}, seconds}.

    With extra raters in the dataset (`data synth --raters N`), each case also gets `ged` and
    `best_dice` of the thresholded samples as a candidate set against all N + 1 annotations, and
    `ged_mean_only` of the mean prediction alone (a single prediction repeated)."""
    t0 = time.perf_counter()
    tasks = list(tasks or seg.tasks)
    per_case = []
    n_images = 0
    bins = {t: np.zeros((3, BINS)) for t in tasks}  # per bin: Σ p, Σ y, count (reliability diagram)
    for case in ds.cases_in(split, sites):
        ss = load_slices(ds, tasks, prep=seg.preprocessing, cases=[case])
        order = sorted(range(len(ss)), key=lambda i: ss.meta[i].get("slice", 0))
        samples = source.samples(ss.images[order])  # [T, S, K, H, W]
        maps = uncertainty_maps(samples)  # each [S, K, H, W]
        n_images += len(order)
        raters = [ss.labels[order]] + [
            load_slices(ds, tasks, prep=seg.preprocessing, cases=[case], rater=r).labels[order]
            for r in range(1, ds.n_raters + 1)
        ]  # each [S, K', H, W]
        metrics = {}
        for t in tasks:
            k, j = seg.tasks.index(t), ss.tasks.index(t)
            mean = maps["mean"][:, k].numpy()
            ref = ss.labels[order][:, j].astype(bool)
            m = case_uncertainty_metrics(mean, maps[UNCERTAINTY_MAP][:, k].numpy(), ref)
            m["dice"] = dice(mean > 0.5, ref)
            idx = np.minimum((mean.ravel() * BINS).astype(int), BINS - 1)
            bins[t] += [np.bincount(idx, w, BINS) for w in (mean.ravel(), ref.ravel(), None)]
            if len(raters) > 1:  # candidate sets: each sample, thresholded, is one candidate
                cands = [(samples[i, :, k] > 0.5).numpy() for i in range(len(samples))]
                annotations = [r[:, j].astype(bool) for r in raters]
                m["ged"] = ged(cands, annotations)
                m["best_dice"] = best_candidate_dice(cands, annotations)
                m["ged_mean_only"] = ged([mean > 0.5], annotations)  # the mean prediction, as one candidate
            metrics[t] = m
        per_case.append({"case": case, "site": ds.site(case), "metrics": metrics})
    keys = list(per_case[0]["metrics"][tasks[0]]) if per_case else []

    def means(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
        return {t: {k: _nanmean([r["metrics"][t][k] for r in rows]) for k in keys} for t in tasks}

    sites_seen = sorted({r["site"] for r in per_case})
    seconds = time.perf_counter() - t0
    return {
        "source": getattr(source, "name", type(source).__name__),
        "samples": getattr(source, "t", None) or len(getattr(source, "members", [])),
        "uncertainty_map": UNCERTAINTY_MAP,
        "n_cases": len(per_case),
        "seconds": round(seconds, 3),
        "seconds_per_image": round(seconds / max(n_images, 1), 5),
        "mean": means(per_case),
        "per_site": {s: means([r for r in per_case if r["site"] == s]) for s in sites_seen},
        "reliability": {
            t: {
                "mean_p": (b[0] / np.maximum(b[2], 1)).tolist(),
                "frequency": (b[1] / np.maximum(b[2], 1)).tolist(),
                "count": b[2].astype(int).tolist(),
            }
            for t, b in bins.items()
        },
        "per_case": per_case,
    }
