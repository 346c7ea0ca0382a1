"""Per-case segmentation metrics for binary masks, with nnU-Net's definitions and empty-mask rules.

`case_metrics(pred, ref, spacing)` gives, for one binary mask pair (2-D [H, W] or 3-D [X, Y, Z]):
  TP, FP, FN, TN   voxel counts (nnU-Net `compute_tp_fp_fn_tn`)
  n_pred, n_ref    foreground voxels in the prediction / reference (nnU-Net keys)
  Dice = 2TP / (2TP + FP + FN),  IoU = TP / (TP + FP + FN)
  HD95             95th-percentile symmetric Hausdorff distance between the mask surfaces (MONAI),
                   in the units of `spacing` (mm if given in mm, else pixels)

Empty masks (the rules nnU-Net v2 uses, so our numbers compare with its summary.json):
  - reference and prediction both empty: Dice = IoU = NaN. The case has no foreground to score;
    nnU-Net stores NaN and `mean` uses nanmean, so such cases drop out of the mean instead of
    counting as a perfect 1 or a failed 0.
  - exactly one of them empty: Dice = IoU = 0 (the formulas give 0; it is a real miss or a false alarm).
  - HD95 is NaN when EITHER mask is empty: a distance to an empty surface is undefined (MONAI returns
    inf/NaN with a warning). The miss is already penalised by Dice = 0, and a NaN keeps one empty
    prediction from turning the mean distance into infinity. `summarize` reports how many cases
    each mean is over (`n_valid`), so a mean HD95 over few cases is visible as such.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence

import numpy as np

METRICS = ("Dice", "IoU", "HD95", "TP", "FP", "FN", "TN", "n_pred", "n_ref")


def _binary(x: np.ndarray) -> np.ndarray:
    return np.asarray(x).astype(bool, copy=False)


def dice(a: np.ndarray, b: np.ndarray, empty: float = math.nan) -> float:
    """Dice of two binary arrays of any (equal) shape, counted over all their elements.

    Pass a whole batch [N, H, W] to get the global ("pseudo") Dice nnU-Net logs during training.
    Returns `empty` (NaN by default, as nnU-Net) when both arrays are empty.
    """
    a, b = _binary(a), _binary(b)
    if a.shape != b.shape:
        raise ValueError(f"dice: shapes differ {a.shape} vs {b.shape}")
    inter = int(np.count_nonzero(a & b))
    total = int(np.count_nonzero(a)) + int(np.count_nonzero(b))
    return float(empty) if total == 0 else 2.0 * inter / total


def hd95(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float] | None = None) -> float:
    """95th-percentile symmetric Hausdorff distance (MONAI), NaN if either mask is empty.

    `spacing` gives the voxel size per axis (same length as the mask's dimensions); None = 1 pixel.
    """
    import torch
    from monai.metrics import compute_hausdorff_distance

    pred, ref = _binary(pred), _binary(ref)
    if not pred.any() or not ref.any():
        return math.nan
    sp = None if spacing is None else [float(s) for s in spacing]
    if sp is not None and len(sp) != pred.ndim:
        raise ValueError(f"hd95: spacing {sp} has {len(sp)} values for a {pred.ndim}-D mask")
    with warnings.catch_warnings():  # MONAI 1.5+ warns about its own internal use of a deprecated argument
        warnings.simplefilter("ignore", FutureWarning)
        d = compute_hausdorff_distance(
            torch.as_tensor(pred)[None, None],
            torch.as_tensor(ref)[None, None],
            include_background=True,  # our single channel IS the foreground
            percentile=95,
            spacing=sp,
        )
    return float(d.reshape(-1)[0])


def case_metrics(
    pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float] | None = None
) -> dict[str, float]:
    """All METRICS for one case; `pred` and `ref` are binary arrays of the same shape (2-D or 3-D)."""
    pred, ref = _binary(pred), _binary(ref)
    if pred.shape != ref.shape:
        raise ValueError(f"case_metrics: prediction {pred.shape} and reference {ref.shape} differ in shape")
    tp = int(np.count_nonzero(pred & ref))
    fp = int(np.count_nonzero(pred & ~ref))
    fn = int(np.count_nonzero(~pred & ref))
    tn = int(pred.size) - tp - fp - fn
    denom = tp + fp + fn
    return {
        "Dice": math.nan if denom == 0 else 2.0 * tp / (2 * tp + fp + fn),
        "IoU": math.nan if denom == 0 else tp / denom,
        "HD95": hd95(pred, ref, spacing),
        "TP": tp,
        "FP": fp,
        "FN": fn,
        "TN": tn,
        "n_pred": tp + fp,
        "n_ref": tp + fn,
    }


def summarize(records: Iterable[dict[str, float]]) -> dict[str, dict[str, float]]:
    """Mean (nanmean), sample SD (nanstd, ddof=1) and n_valid (non-NaN count) of each metric.

    Returns {"mean": {metric: value}, "sd": {...}, "n_valid": {...}}; a metric with no valid value has
    mean NaN, and one with fewer than 2 valid values has SD NaN.
    """
    records = list(records)
    out: dict[str, dict[str, float]] = {"mean": {}, "sd": {}, "n_valid": {}}
    keys = [k for k in METRICS if any(k in r for r in records)] or list(METRICS)
    for k in keys:
        vals = np.array([r.get(k, math.nan) for r in records], dtype=np.float64)
        ok = vals[~np.isnan(vals)]
        out["mean"][k] = float(ok.mean()) if ok.size else math.nan
        out["sd"][k] = float(ok.std(ddof=1)) if ok.size >= 2 else math.nan
        out["n_valid"][k] = int(ok.size)
    return out
