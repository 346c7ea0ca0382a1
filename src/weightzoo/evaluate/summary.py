"""Evaluate a Segmenter on a dataset's cases and write an nnU-Net-style summary.json.

Where the numbers are computed: in the PREPROCESSED grid. Each case is loaded with the segmenter's
own `Preprocessing` (`load_slices`: normalised, sliced along `prep.axis`, every slice resized to
`prep.size`), predicted slice by slice, and the slices of a case are stacked back into one volume
[S, H, W] (a 2-D image is one [H, W] slice). Metrics are PER CASE on that volume (not per slice), so a
case's Dice weighs all its voxels together, as in nnU-Net. This is the grid every route sees, so
routes are compared on identical inputs; it differs from the original grid by the in-plane resize.

HD95 units: the voxel spacing of the preprocessed grid is derived from the original image — NIfTI:
header voxel sizes (mm), in-plane ones scaled by original/resized size; 2-D images: original pixels
(scaled the same way). HD95 is thus in mm for NIfTI and in original-image pixels for 2-D images
(`summary["hd95_unit"]`), comparable across models with different `prep.size`. `evaluate_slices`
on a bare SliceSet knows no spacing and reports pixels of the preprocessed grid unless given one.

3-D models (`segment_volume`: our `--dims 3` models, ingested nnU-Net checkpoints) are scored as
nnU-Net scores them: on each case's ORIGINAL grid (canonical orientation), the prediction mapped back
by the model's own pipeline, HD95 in mm from the header's voxel sizes.

Empty-mask rules and the mean (nanmean) are those of nnU-Net; see `weightzoo.evaluate.metrics`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from weightzoo.data.raw import RawDataset
from weightzoo.data.slices import Preprocessing, SliceSet, load_slices
from weightzoo.errors import InputError, UnknownNameError
from weightzoo.evaluate.metrics import METRICS, case_metrics, summarize
from weightzoo.fileio import atomic_write_json
from weightzoo.postprocess import threshold as apply_threshold
from weightzoo.segmenter import Segmenter, segment_image

SUMMARY_FORMAT = "weightzoo-evaluation"
EMPTY_RULES = (
    "Dice/IoU NaN when reference and prediction are both empty; HD95 NaN when either is; means are nanmeans"
)


def _check_tasks(seg: Segmenter, tasks: Sequence[str] | None) -> list[str]:
    chosen = list(tasks) if tasks else list(seg.tasks)
    for t in chosen:
        if t not in seg.tasks:
            raise UnknownNameError("task", t, seg.tasks, f"model {seg.name}")
    return chosen


def _case_volumes(seg: Segmenter, ss: SliceSet, tasks: Sequence[str], thr: float) -> dict[str, list]:
    """{case: [pred [T, S, H, W] uint8, ref [T, S, H, W] uint8]} for the slices of a SliceSet."""
    label_idx = [ss.tasks.index(t) for t in tasks]
    pred_idx = [seg.tasks.index(t) for t in tasks]
    # without meta, each slice is its own case
    meta = ss.meta or [{"case": f"slice_{i}", "slice": 0} for i in range(len(ss))]
    by_case: dict[str, list[int]] = {}
    for i, m in enumerate(meta):
        by_case.setdefault(str(m["case"]), []).append(i)
    out = {}
    for case, idx in by_case.items():
        idx = sorted(idx, key=lambda i: meta[i].get("slice", 0))
        probs = seg.predict_batch(ss.images[idx])[:, pred_idx]  # [S, T, H, W]
        pred = np.moveaxis(apply_threshold(probs, thr), 1, 0)
        ref = np.moveaxis(ss.labels[idx][:, label_idx], 1, 0)
        out[case] = [pred, ref]
    return out


def _metrics_of(
    pred: np.ndarray, ref: np.ndarray, tasks: Sequence[str], spacing: Sequence[float] | None
) -> dict[str, Any]:
    """Per-task metrics for one case; a single-slice case is scored as the 2-D image it is."""
    sp = list(spacing) if spacing is not None else None
    if pred.shape[1] == 1:
        pred, ref = pred[:, 0], ref[:, 0]
        if sp is not None and len(sp) == 3:
            sp = sp[1:]
    return {t: case_metrics(pred[j], ref[j], sp) for j, t in enumerate(tasks)}


def aggregate(per_case: list[dict[str, Any]], tasks: Sequence[str]) -> dict[str, Any]:
    """nnU-Net's `mean` and `foreground_mean`, plus sd, n_valid and the same per site."""
    out: dict[str, Any] = {"mean": {}, "sd": {}, "n_valid": {}}
    for t in tasks:
        s = summarize(r["metrics"][t] for r in per_case)
        for k in out:
            out[k][t] = s[k]
    # nnU-Net: foreground_mean averages the per-class means (classes = our tasks)
    out["foreground_mean"] = {k: _nanmean([out["mean"][t][k] for t in tasks]) for k in METRICS}
    sites = sorted({r["site"] for r in per_case})
    out["per_site"], out["per_site_sd"], out["per_site_n_cases"] = {}, {}, {}
    for site in sites:
        rows = [r for r in per_case if r["site"] == site]
        out["per_site_n_cases"][site] = len(rows)
        out["per_site"][site], out["per_site_sd"][site] = {}, {}
        for t in tasks:
            s = summarize(r["metrics"][t] for r in rows)
            out["per_site"][site][t], out["per_site_sd"][site][t] = s["mean"], s["sd"]
    return out


def _nanmean(values: Iterable[float]) -> float:
    v = np.array(list(values), dtype=np.float64)
    v = v[~np.isnan(v)]
    return float(v.mean()) if v.size else math.nan


def grid_spacing(ds: RawDataset, case: str, prep: Preprocessing) -> tuple[list[float], str]:
    """Voxel spacing of a case in the preprocessed grid, ordered like the stacked volume [S, H, W].

    NIfTI: (slice-axis size, in-plane sizes * original / resized) in mm, from the header only (the
    voxel data is not read again). 2-D: original pixels per preprocessed pixel, (h / H, w / W).
    """
    path = ds.image_files(case)[0]
    H, W = prep.size
    if ds.file_ending in (".nii.gz", ".nii"):
        import nibabel as nib
        from nibabel.orientations import io_orientation

        img = nib.load(str(path))  # lazy: header only
        ornt = io_orientation(img.affine)
        shape, zooms = [0, 0, 0], [0.0, 0.0, 0.0]
        for j in range(3):  # on-disk axis j becomes canonical (RAS) axis ornt[j, 0]
            ax = int(ornt[j, 0])
            shape[ax], zooms[ax] = int(img.shape[j]), float(img.header.get_zooms()[j])
        a = prep.axis
        r0, r1 = [i for i in range(3) if i != a]
        return [zooms[a], zooms[r0] * shape[r0] / H, zooms[r1] * shape[r1] / W], "mm"
    from weightzoo.data.io import read_image

    h, w = read_image(path).spatial_shape  # 2-D images are small; re-reading is cheap
    return [h / H, w / W], "px"


def evaluate_slices(
    seg: Segmenter,
    sliceset: SliceSet,
    threshold: float = 0.5,
    spacing: Sequence[float] | None = None,
    tasks: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Evaluate on a SliceSet already in memory (e.g. the validation slices during training).

    Slices are grouped into cases by `meta["case"]` and stacked in `meta["slice"]` order; metrics
    are per case. `spacing` (per axis of the stacked [S, H, W] volume, or [H, W]) defaults to 1 pixel
    of the preprocessed grid. Returns the same structure as `evaluate_segmenter`, without file info.
    """
    t0 = time.perf_counter()
    tasks = _check_tasks(seg, tasks or [t for t in sliceset.tasks if t in seg.tasks] or sliceset.tasks)
    for t in tasks:
        if t not in sliceset.tasks:
            raise UnknownNameError("task", t, sliceset.tasks, "slice set labels")
    meta_of = {str(m["case"]): m for m in sliceset.meta}
    per_case = []
    for case, (pred, ref) in _case_volumes(seg, sliceset, tasks, threshold).items():
        m = meta_of.get(case, {})
        per_case.append(
            {
                "case": case,
                "subject": str(m.get("subject", case)),
                "site": str(m.get("site", "default")),
                "metrics": _metrics_of(pred, ref, tasks, spacing),
            }
        )
    return _assemble(seg, per_case, tasks, threshold, "px" if spacing is None else "spacing units", t0, {})


def evaluate_segmenter(
    seg: Segmenter,
    ds: RawDataset,
    split: str | None = "test",
    sites: Sequence[str] | None = None,
    tasks: Sequence[str] | None = None,
    threshold: float = 0.5,
    cases: Sequence[str] | None = None,
    on_case: Callable[[int, int, str], None] | None = None,
) -> dict[str, Any]:
    """Evaluate a Segmenter on the cases of `split` ('train' | 'val' | 'test' | None = all) and `sites`.

    `cases` overrides split and sites; `tasks` defaults to the model's tasks (each must also be a
    task of the dataset). `on_case(i, n, case)` is called after each case (progress bars).
    Returns the summary dict (see module docstring; write it with `write_summary`).
    """
    t0 = time.perf_counter()
    apply_threshold(np.zeros(1), threshold)  # validate before reading any data
    tasks = _check_tasks(seg, tasks)
    for t in tasks:
        ds.task_labels(t)  # unknown dataset task -> one-line error naming dataset.json
    chosen = list(cases) if cases is not None else ds.cases_in(split, sites)
    if not chosen:
        raise InputError(
            f"no cases in split={split} sites={list(sites) if sites else 'all'}",
            "check the dataset's splits and sites",
            ds.root,
        )
    prep = seg.preprocessing
    volume_model = hasattr(seg, "segment_volume")
    per_case, unit = [], "mm" if volume_model else "px"
    for i, case in enumerate(chosen):
        if volume_model:
            pred, ref, spacing = _original_grid_case(seg, ds, case, tasks, threshold)
        else:
            ss = load_slices(ds, tasks, prep=prep, cases=[case])  # one case at a time: memory stays bounded
            spacing, unit = grid_spacing(ds, case, prep)
            ((pred, ref),) = _case_volumes(seg, ss, tasks, threshold).values()
        per_case.append(
            {
                "case": case,
                "subject": ds.subject(case),
                "site": ds.site(case),
                "reference_file": str(ds.label_file(case)),
                "metrics": _metrics_of(pred, ref, tasks, spacing),
            }
        )
        if on_case is not None:
            on_case(i + 1, len(chosen), case)
    extra = {
        "dataset": ds.name,
        "dataset_root": str(ds.root),
        "split": split or "all",
        "sites": sorted({ds.site(c) for c in chosen}),
    }
    return _assemble(seg, per_case, tasks, threshold, unit, t0, extra)


def _original_grid_case(
    seg: Segmenter, ds: RawDataset, case: str, tasks: Sequence[str], thr: float
) -> tuple[np.ndarray, np.ndarray, list[float]]:
    """A 3-D model on one case's own grid: pred, ref [T, X, Y, Z] uint8 (canonical) and spacing (mm).
    Softmax (label) models are scored on nnU-Net's label map, each task being its label values."""
    from weightzoo.data.slices import binary_task_masks, load_case

    image, label = load_case(ds, case)
    ref = binary_task_masks(label, [ds.task_labels(t) for t in tasks])
    if getattr(seg, "output_kind", "sigmoid") == "softmax":
        labels = seg.segment_labels(image)  # type: ignore[attr-defined]
        pred = np.stack([np.isin(labels, seg.pipeline.task_labels[t]) for t in tasks]).astype(np.uint8)  # type: ignore[attr-defined]
    else:
        probs = segment_image(seg, image)
        pred = apply_threshold(probs[[seg.tasks.index(t) for t in tasks]], thr)
    return pred, ref, list(image.spacing)


def _assemble(
    seg: Segmenter,
    per_case: list[dict[str, Any]],
    tasks: Sequence[str],
    thr: float,
    unit: str,
    t0: float,
    extra: dict[str, Any],
) -> dict[str, Any]:
    agg, prep = aggregate(per_case, tasks), seg.preprocessing
    return {
        "format": SUMMARY_FORMAT,
        "version": 1,
        "model": seg.name,
        "n_params": int(seg.n_params),
        "seconds_to_build": float(seg.seconds_to_build),
        **extra,
        "tasks": list(tasks),
        "threshold": float(thr),
        "n_cases": len(per_case),
        "grid": "original: each case's own grid (3-D model)"
        if hasattr(seg, "segment_volume")
        else f"preprocessed: slices along canonical axis {prep.axis}, resized to {list(prep.size)}",
        "hd95_unit": unit,
        "empty_rules": EMPTY_RULES,
        "seconds_to_evaluate": round(time.perf_counter() - t0, 3),
        **agg,
        "metric_per_case": per_case,
    }


def _jsonable(x: Any) -> Any:
    """NaN/inf -> None (so the file is strict JSON), numpy scalars -> Python."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def write_summary(summary: dict[str, Any], path: str | Path) -> Path:
    """Write a summary atomically as strict JSON (NaN and inf become null)."""
    return atomic_write_json(path, _jsonable(summary))


def summary_line(summary: dict[str, Any], task: str, metric: str = "Dice", site: str | None = None) -> str:
    """'0.912 ± 0.031' for a task (and site), '–' where undefined: what tables print."""
    mean = summary["mean"] if site is None else summary["per_site"][site]
    sd = summary["sd"] if site is None else summary["per_site_sd"][site]
    m, s = mean[task].get(metric), sd[task].get(metric)
    if m is None or (isinstance(m, float) and math.isnan(m)):
        return "–"
    if s is None or (isinstance(s, float) and math.isnan(s)):
        return f"{m:.3f}"
    return f"{m:.3f} ± {s:.3f}"


def evaluate_by_site(
    segmenter_for: Callable[[str], tuple[Segmenter, str]],
    ds: RawDataset,
    split: str | None = "test",
    sites: Sequence[str] | None = None,
    tasks: Sequence[str] | None = None,
    threshold: float = 0.5,
    on_case: Callable[[int, int, str], None] | None = None,
    model_name: str = "model",
) -> dict[str, Any]:
    """Evaluate with each case routed to its site's Segmenter: `segmenter_for(site)` -> (Segmenter,
    what was used, e.g. the head's name). One summary over all chosen cases, plus `used` {site: what}."""
    cases = ds.cases_in(split, sites)
    if not cases:
        raise InputError(
            f"no cases in split={split} sites={list(sites) if sites else 'all'}",
            "check the dataset's splits and sites",
            ds.root,
        )
    per_site: dict[str, list[str]] = {}
    for c in cases:
        per_site.setdefault(ds.site(c), []).append(c)
    merged: dict[str, Any] | None = None
    seconds, per_case, used, done = 0.0, [], {}, 0
    for site, site_cases in per_site.items():
        seg, used[site] = segmenter_for(site)

        def progress(i: int, n: int, case: str, offset: int = done) -> None:
            if on_case is not None:
                on_case(offset + i, len(cases), case)

        summ = evaluate_segmenter(
            seg, ds, split, tasks=tasks, threshold=threshold, cases=site_cases, on_case=progress
        )
        done += len(site_cases)
        seconds += summ["seconds_to_evaluate"]
        per_case += summ["metric_per_case"]
        merged = merged or summ
    assert merged is not None
    order = {c: i for i, c in enumerate(cases)}
    per_case.sort(key=lambda r: order[r["case"]])
    merged.update(aggregate(per_case, merged["tasks"]))
    merged.update(
        model=model_name,
        sites=sorted(per_site),
        n_cases=len(per_case),
        used=used,
        seconds_to_evaluate=round(seconds, 3),
        metric_per_case=per_case,
    )
    return merged
