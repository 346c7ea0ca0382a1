"""The accuracy–cost front of a scale hypernetwork: for each φ, Dice on a split, exact convolution FLOPs
and measured latency of the sampled network, as a table (front.json) and a figure (front.png).

Latency: median wall time of one forward on one [C, H, W] input (the model's slice size), after
warm-up, on the chosen device, in this process's thread setting; φ values are timed interleaved
(round-robin) so a machine that slows down mid-run does not favour one φ.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from weightzoo.data.raw import RawDataset
from weightzoo.data.slices import Preprocessing
from weightzoo.evaluate.summary import evaluate_segmenter
from weightzoo.fileio import atomic_write_json
from weightzoo.hyper.model import HyperUNet, load_hyper
from weightzoo.nets.functional_unet import unet_flops
from weightzoo.segmenter import NetSegmenter, resolve_device


def default_scales(lo: float, hi: float, n: int = 11) -> list[float]:
    return [round(float(v), 4) for v in np.linspace(lo, hi, n)]


@torch.no_grad()
def latencies(
    nets: Sequence[torch.nn.Module], shape: tuple[int, ...], device: torch.device, repeats: int = 20
) -> list[float]:
    """Median seconds per forward of each net on one input of `shape`, interleaved round-robin."""
    x = torch.randn(1, *shape, device=device)
    nets = [n.to(device).eval() for n in nets]
    for n in nets:  # warm-up
        n(x)
    times: list[list[float]] = [[] for _ in nets]
    for _ in range(repeats):
        for i, n in enumerate(nets):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t = time.perf_counter()
            n(x)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times[i].append(time.perf_counter() - t)
    return [statistics.median(t) for t in times]


def scale_front(
    model: HyperUNet,
    prep: Preprocessing,
    tasks: list[str],
    ds: RawDataset,
    split: str = "val",
    scales: Sequence[float] | None = None,
    device: str = "cpu",
    repeats: int = 20,
    on_scale: Callable[[int, int, float], None] | None = None,
    sites: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """One row per φ: {"scale", "dice" {task: mean over cases}, "flops", "latency_ms", "n_cases"}."""
    lo, hi = model.hcfg.scale_range
    scales = list(scales) if scales is not None else default_scales(lo, hi)
    dev = resolve_device(device)
    nets, rows = [], []
    for i, phi in enumerate(scales):
        net = model.sample_network(model.check_scale(phi))
        seg = NetSegmenter(net, model.sample_spec(phi), tasks, prep, f"scale={phi}", 0.0, dev)
        summ = evaluate_segmenter(seg, ds, split, sites=sites, tasks=tasks)
        rows.append(
            {
                "scale": phi,
                "dice": {t: summ["mean"][t]["Dice"] for t in tasks},
                "flops": unet_flops(model.kw, prep.channels, len(tasks), tuple(prep.size), "scale", phi),
                "n_cases": summ["n_cases"],
            }
        )
        nets.append(net)
        if on_scale is not None:
            on_scale(i + 1, len(scales), phi)
    for row, sec in zip(rows, latencies(nets, (prep.channels, *prep.size), dev, repeats), strict=True):
        row["latency_ms"] = round(sec * 1000, 3)
    return rows


def front_figure(
    rows: list[dict[str, Any]], path: Path, title: str = "", baselines: list[dict[str, Any]] | None = None
) -> Path:
    """Dice vs GFLOPs and vs latency (one line per task; fixed-φ baselines as points if given)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    tasks = list(rows[0]["dice"])
    for ax, key, label in ((axes[0], "flops", "GFLOPs per slice"), (axes[1], "latency_ms", "latency (ms)")):
        for t in tasks:
            xs = [r[key] / 1e9 if key == "flops" else r[key] for r in rows]
            ax.plot(xs, [r["dice"][t] for r in rows], "o-", label=f"hypernetwork ({t})")
            for r, x in zip(rows, xs, strict=True):
                ax.annotate(
                    f"{r['scale']:g}",
                    (x, r["dice"][t]),
                    fontsize=7,
                    textcoords="offset points",
                    xytext=(2, 3),
                )
            for b in baselines or []:
                if key in b:
                    bx = b[key] / 1e9 if key == "flops" else b[key]
                    ax.plot([bx], [b["dice"][t]], "s", color="black", ms=5)
        ax.set_xlabel(label)
        ax.set_ylabel("Dice")
        ax.grid(alpha=0.3)
    if baselines:
        axes[0].plot([], [], "s", color="black", ms=5, label="fixed-φ network")
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path


def write_front(
    folder: str | Path,
    out: str | Path,
    ds: RawDataset,
    split: str,
    device: str,
    scales: Sequence[float] | None,
    on_scale: Callable[[int, int, float], None] | None = None,
) -> tuple[list[dict[str, Any]], Path]:
    """`weightzoo hyper front`: the front of a hyper folder on a dataset split -> OUT/front.json + front.png."""
    model, meta = load_hyper(folder)
    if model.hcfg.condition != "scale":
        from weightzoo.errors import InputError

        raise InputError("hyper front needs a scale hypernetwork", "train one with --condition scale", folder)
    prep = Preprocessing.from_dict(meta["preprocessing"])
    rows = scale_front(model, prep, meta["tasks"], ds, split, scales, device, on_scale=on_scale)
    out = Path(out)
    atomic_write_json(
        out / "front.json",
        {"model": str(folder), "dataset": ds.name, "split": split, "device": device, "rows": rows},
    )
    fig = front_figure(rows, out / "front.png", f"{Path(folder).name} on {ds.name} ({split})")
    return rows, fig
