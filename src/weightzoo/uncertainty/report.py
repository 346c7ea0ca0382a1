"""Figures for uncertainty: reliability diagrams and one map beside its image."""

from __future__ import annotations

from typing import Any

import numpy as np


def reliability_figure(curves: dict[str, dict[str, list[float]]], title: str = "") -> Any:
    """One reliability diagram: {label: evaluate_uncertainty(...)["reliability"][task]} per source.
    Points are bins with pixels; the diagonal is perfect calibration; the bars show pixel counts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, hist) = plt.subplots(2, 1, figsize=(5, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], color="k", lw=0.8, ls=":", label="perfectly calibrated")
    width = 1.0 / max(len(next(iter(curves.values()))["count"]), 1)
    for i, (label, c) in enumerate(curves.items()):
        n = np.asarray(c["count"])
        keep = n > 0
        ax.plot(
            np.asarray(c["mean_p"])[keep], np.asarray(c["frequency"])[keep], marker="o", ms=3, label=label
        )
        centres = (np.arange(len(n)) + 0.5) * width
        hist.bar(centres + (i - len(curves) / 2) * width / len(curves), n, width / len(curves), label=label)
    ax.set_ylabel("observed foreground frequency")
    ax.set_title(title)
    ax.legend(fontsize=7)
    hist.set_yscale("log")
    hist.set_xlabel("predicted foreground probability (mean of the samples)")
    hist.set_ylabel("pixels")
    fig.tight_layout()
    return fig


def map_figure(image: np.ndarray, maps: dict[str, np.ndarray], reference: np.ndarray | None = None) -> Any:
    """An image slice, the mean prediction and the uncertainty maps side by side (contour: reference)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 1 + len(maps), figsize=(2.6 * (1 + len(maps)), 2.8))
    axes[0].imshow(image.T, cmap="gray", origin="lower")
    axes[0].set_title("image")
    for ax, (name, m) in zip(axes[1:], maps.items(), strict=True):
        im = ax.imshow(m.T, cmap="magma", origin="lower", vmin=0, vmax=max(float(m.max()), 1e-6))
        if reference is not None:
            ax.contour(reference.T.astype(float), levels=[0.5], colors="c", linewidths=0.6)
        ax.set_title(name)
        fig.colorbar(im, ax=ax, fraction=0.046)
    for ax in axes:
        ax.set_axis_off()
    fig.tight_layout()
    return fig
