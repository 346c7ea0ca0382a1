"""Quality-control pictures: a mask drawn over its image, saved as PNG (matplotlib, Agg, no display).

For a 2-D image one panel; for a volume a montage of the `n_slices` slices (along canonical `axis`)
with the most foreground, in slice order, so a reviewer sees where the mask is, not empty slices.
The prediction is a filled red overlay with a red contour; an optional reference mask is a green contour.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np

from weightzoo.data.io import Image
from weightzoo.errors import InputError
from weightzoo.fileio import atomic_write_bytes


def pick_slices(mask: np.ndarray, n: int, axis: int = 2) -> list[int]:
    """Indices of the `n` slices along `axis` with the most foreground (sorted); an empty mask gives
    `n` evenly spaced slices around the middle."""
    n_total = mask.shape[axis]
    n = max(1, min(n, n_total))
    fg = np.asarray(mask).astype(bool).sum(axis=tuple(i for i in range(mask.ndim) if i != axis))
    if not fg.any():
        return sorted({round(float(x)) for x in np.linspace(0, n_total - 1, n + 2)[1:-1]} or {n_total // 2})
    order = np.argsort(-fg, kind="stable")[:n]
    return sorted(int(i) for i in order if fg[i] > 0) or [int(order[0])]


def _window(arr: np.ndarray) -> tuple[float, float]:
    """Display window for a whole image: min..max for RGB, the 1-99 % percentiles for gray."""
    if arr.shape[0] == 3:
        return float(arr.min()), float(arr.max())
    lo, hi = np.percentile(arr, [1, 99])
    return float(lo), float(hi)


def _display(image: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """[C, h, w] -> what imshow shows: [h, w, 3] RGB or [h, w] gray, scaled to 0..1."""
    x = np.moveaxis(image, 0, -1) if image.shape[0] == 3 else image[0]
    return np.clip((x.astype(np.float32) - lo) / max(hi - lo, 1e-8), 0, 1)


def write_overlay(
    path: str | Path,
    image: Image,
    mask: np.ndarray,
    n_slices: int = 6,
    axis: int = 2,
    reference: np.ndarray | None = None,
    title: str | None = None,
) -> Path:
    """Write a PNG of `mask` over `image`.

    image: an `Image` (array [C, H, W] for 2-D, [1, X, Y, Z] canonical for a volume).
    mask / reference: binary, [H, W] for 2-D or canonical [X, Y, Z] for a volume (the image's grid).
    Volume slices are shown radiologically upright: first in-plane axis horizontal, second vertical.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure

    arr, m = image.array, np.asarray(mask).astype(bool)
    if m.shape != image.spatial_shape or (
        reference is not None and np.shape(reference) != image.spatial_shape
    ):
        raise InputError(
            f"overlay mask shape {m.shape} differs from the image {image.spatial_shape}",
            "pass a mask on the image grid",
            image.path,
        )
    ref = None if reference is None else np.asarray(reference).astype(bool)
    if image.is_volume:
        idx = pick_slices(m, n_slices, axis)
        panels = [
            (
                np.take(arr, i, axis=axis + 1),
                np.take(m, i, axis=axis),
                None if ref is None else np.take(ref, i, axis=axis),
                f"slice {i}",
            )
            for i in idx
        ]
        # canonical [x, y] -> rows = y (anterior up via origin='lower'), cols = x
        panels = [(im.transpose(0, 2, 1), mk.T, None if r is None else r.T, t) for im, mk, r, t in panels]
        origin = "lower"
    else:
        panels, origin = [(arr, m, ref, "")], "upper"
    aspect = 1.0
    if image.is_volume and len(image.spacing) == 3:  # pixel height / width of the shown plane
        r0, r1 = (i for i in range(3) if i != axis)
        aspect = image.spacing[r1] / image.spacing[r0]
    lo, hi = _window(arr)
    red = ListedColormap(["red"])
    cols = min(len(panels), 4)
    rows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(3 * cols, 3 * rows + (0.4 if title else 0)), dpi=100)
    FigureCanvasAgg(fig)
    for k, (im, mk, r, label) in enumerate(panels):
        ax = fig.add_subplot(rows, cols, k + 1)
        ax.imshow(_display(im, lo, hi), cmap="gray", vmin=0, vmax=1, origin=origin, aspect=aspect)
        ax.imshow(np.ma.masked_where(~mk, mk), cmap=red, alpha=0.3, origin=origin, aspect=aspect)
        # contour without `origin`: its Z[0, 0] then sits on pixel centre (0, 0), as imshow's does
        if mk.any() and min(mk.shape) > 1:
            ax.contour(mk.astype(float), levels=[0.5], colors="red", linewidths=0.8)
        if r is not None and r.any() and min(r.shape) > 1:
            ax.contour(r.astype(float), levels=[0.5], colors="lime", linewidths=0.8)
        ax.set_title(label, fontsize=8)
        ax.set_axis_off()
    if title:
        fig.suptitle(title, fontsize=9)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return atomic_write_bytes(path, buf.getvalue())
