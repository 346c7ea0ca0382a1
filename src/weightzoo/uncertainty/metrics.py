"""Is the uncertainty any good? Calibration, uncertainty–error agreement, and candidate sets.

Per case and task, on the preprocessed grid (as `weightzoo evaluate`), for the foreground
probability p̄ (mean of the samples) against the binary reference y:

  ece, ace, mce   calibration error of p̄ over 20 equal-width bins: expected (weighted by bin counts),
                  average (unweighted over non-empty bins), maximum. MONAI's CalibrationErrorMetric.
  *_band          the same, only on pixels within BAND px (city-block, in-plane) of the reference's boundary, inside or out:
                  global figures are dominated by easy background and hide boundary miscalibration.
  brier, nll      mean (p̄ − y)² and mean −log-likelihood (p̄ clamped to [1e-7, 1 − 1e-7]).
  auroc           AUROC of the uncertainty map (entropy) as a detector of error pixels (mask ≠ y), MONAI's
                  compute_roc_auc. NaN when the case has no error pixel or no correct one.
  ueo             uncertainty–error overlap (Jungo & Reyes 2019): max over thresholds τ of the Dice between
                  {uncertainty > τ} and the error mask. NaN when there is no error pixel.
Candidate sets against several raters (each a binary mask), d(a, b) = 1 − IoU(a, b), with d = 0 when
both are empty:
  ged             generalised energy distance 2·E d(s, y) − E d(s, s') − E d(y, y'); lower is better.
  best_dice       mean over raters of the best candidate's Dice with that rater.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from scipy import ndimage

from weightzoo.uncertainty.maps import EPS

BINS = 20
BAND = 3  # pixels each side of the reference boundary
THRESHOLDS = np.linspace(0.0, 1.0, 51)[1:-1]


def boundary_band(ref: np.ndarray, width: int = BAND) -> np.ndarray:
    """Pixels within `width` of the reference's boundary (in-plane, per slice for [S, H, W])."""
    ref = ref.astype(bool)
    structure = ndimage.generate_binary_structure(ref.ndim, 1)
    if ref.ndim == 3:  # no dilation across slices: slices may be far apart
        structure[0] = structure[2] = False
    if not ref.any():
        return np.zeros_like(ref)
    outer = ndimage.binary_dilation(ref, structure, iterations=width)
    inner = ndimage.binary_erosion(ref, structure, iterations=width, border_value=1)
    return outer & ~inner


def calibration(prob: np.ndarray, ref: np.ndarray, bins: int = BINS) -> dict[str, float]:
    """{ece, ace, mce} of the foreground probability (MONAI); NaN for an empty pixel set."""
    from monai.metrics import CalibrationErrorMetric

    if prob.size == 0:
        return {"ece": math.nan, "ace": math.nan, "mce": math.nan}
    p = torch.as_tensor(prob, dtype=torch.float32).reshape(1, 1, -1)
    y = torch.as_tensor(ref, dtype=torch.float32).reshape(1, 1, -1)
    out = {}
    for name, reduction in (("ece", "expected"), ("ace", "average"), ("mce", "maximum")):
        metric = CalibrationErrorMetric(
            num_bins=bins, include_background=True, calibration_reduction=reduction
        )
        out[name] = float(metric(p, y).reshape(-1)[0])
    return out


def auroc(score: np.ndarray, error: np.ndarray) -> float:
    from monai.metrics import compute_roc_auc

    error = error.astype(bool).reshape(-1)
    if error.all() or not error.any():
        return math.nan
    return float(
        compute_roc_auc(torch.as_tensor(score.reshape(-1), dtype=torch.float64), torch.as_tensor(error))
    )


def ueo(score: np.ndarray, error: np.ndarray, thresholds: Sequence[float] = THRESHOLDS) -> float:
    error = error.astype(bool)
    n_err = int(error.sum())
    if n_err == 0:
        return math.nan
    best = 0.0
    for t in thresholds:
        u = score > t
        inter = int((u & error).sum())
        best = max(best, 2 * inter / (int(u.sum()) + n_err))
    return best


def case_uncertainty_metrics(mean: np.ndarray, uncertainty: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    """Every per-case number above for one task: mean probability, an uncertainty map, the reference."""
    ref = ref.astype(bool)
    p = np.clip(mean.astype(np.float64), EPS, 1 - EPS)
    band = boundary_band(ref)
    error = (mean > 0.5) != ref
    out = calibration(mean, ref)
    out.update({f"{k}_band": v for k, v in calibration(mean[band], ref[band]).items()})
    out["brier"] = float(np.mean((mean - ref) ** 2))
    out["nll"] = float(-np.mean(np.where(ref, np.log(p), np.log(1 - p))))
    out["auroc"] = auroc(uncertainty, error)
    out["ueo"] = ueo(uncertainty, error)
    return out


def _iou_distance(a: np.ndarray, b: np.ndarray) -> float:
    union = int((a | b).sum())
    return 0.0 if union == 0 else 1.0 - int((a & b).sum()) / union


def ged(candidates: Sequence[np.ndarray], raters: Sequence[np.ndarray]) -> float:
    """Generalised energy distance with d = 1 − IoU (squared-distance form, as in PHiSeg/Tyche)."""
    s = [np.asarray(c, bool) for c in candidates]
    y = [np.asarray(r, bool) for r in raters]
    cross = np.mean([_iou_distance(a, b) for a in s for b in y])
    within_s = np.mean([_iou_distance(a, b) for a in s for b in s])
    within_y = np.mean([_iou_distance(a, b) for a in y for b in y])
    return float(2 * cross - within_s - within_y)


def best_candidate_dice(candidates: Sequence[np.ndarray], raters: Sequence[np.ndarray]) -> float:
    def dice(a: np.ndarray, b: np.ndarray) -> float:
        total = int(a.sum() + b.sum())
        return 1.0 if total == 0 else 2 * int((a & b).sum()) / total

    s = [np.asarray(c, bool) for c in candidates]
    return float(np.mean([max(dice(c, np.asarray(r, bool)) for c in s) for r in raters]))
