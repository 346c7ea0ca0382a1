"""Turning probabilities into masks: thresholding and keeping the largest connected component."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from weightzoo.errors import InputError


def threshold(probs: np.ndarray, thr: float = 0.5) -> np.ndarray:
    """Binary uint8 mask (same shape as `probs`) of `probs > thr`, as nnU-Net does for sigmoid outputs.

    `thr` must lie in (0, 1): 0 would mark every voxel and 1 none.
    """
    if not 0.0 < float(thr) < 1.0:
        raise InputError(
            f"threshold {thr} is outside (0, 1)", "use e.g. 0.5 (or 0 with `segment` to keep probabilities)"
        )
    return (np.asarray(probs) > thr).astype(np.uint8)


def largest_component(mask: np.ndarray, full_connectivity: bool = True) -> np.ndarray:
    """Keep only the largest connected component of a binary mask (2-D [H, W] or 3-D [X, Y, Z]).

    Components are found in the mask's own dimensionality, so a volume's component may span slices.
    `full_connectivity` counts diagonal neighbours (8 in 2-D, 26 in 3-D; nnU-Net's
    remove_all_but_largest_component does the same); False uses face neighbours only (4 / 6).
    An empty mask stays empty; ties keep the component found first. Returns uint8, same shape.
    """
    m = np.asarray(mask).astype(bool)
    if not m.any():
        return np.zeros(m.shape, dtype=np.uint8)
    structure = ndimage.generate_binary_structure(m.ndim, m.ndim if full_connectivity else 1)
    labels, n = ndimage.label(m, structure=structure)
    if n == 1:
        return m.astype(np.uint8)
    sizes = np.bincount(labels.ravel())[1:]  # voxels per component 1..n
    return (labels == int(np.argmax(sizes)) + 1).astype(np.uint8)
