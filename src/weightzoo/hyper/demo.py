"""The hypernetwork part of `weightzoo demo`: one scale hypernetwork (tiny, cord) trained once, its
accuracy-cost front over φ on the test subjects, and a fixed-φ network (φ = 0.5) trained with the same
steps for reference (table + figure in the report). The full study is benchmarks/hyper_bench.py."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from weightzoo.data.raw import RawDataset
from weightzoo.data.slices import Preprocessing, load_slices
from weightzoo.evaluate.summary import evaluate_segmenter
from weightzoo.hyper.front import front_figure, scale_front
from weightzoo.hyper.model import HyperConfig
from weightzoo.hyper.train import train_fixed_scale, train_hyper_on_slices
from weightzoo.nets.functional_unet import unet_flops
from weightzoo.segmenter import NetSegmenter
from weightzoo.train.config import TrainConfig

REFERENCE_SCALES = (0.5,)  # one fixed-φ network for reference: the demo's time budget


def demo_hyper(
    out_dir: str | Path,
    ds: RawDataset,
    site: str,
    report: Any,
    log: Callable[[str], None] = print,
    steps: int = 150,
) -> dict[str, Any]:
    """Train on `site`'s train subjects (task cord, tiny preset), score on its test subjects."""
    out_dir = Path(out_dir) / "hyper"
    tasks = ["cord"]
    prep = Preprocessing("zscore", (64, 64), 2, ds.n_channels)
    train = load_slices(ds, tasks, prep=prep, cases=ds.cases_in("train", [site]))
    cfg = TrainConfig(tasks=tasks, preset="tiny", optimizer="adam", lr=1e-2, steps=steps, batch_size=8,
                      device="cpu", val_every=steps, checkpoint_every=steps)  # fmt: skip
    t0 = time.perf_counter()
    model, _ = train_hyper_on_slices(train, None, cfg, HyperConfig(condition="scale"))
    hyper_seconds = time.perf_counter() - t0
    rows = scale_front(model, prep, tasks, ds, "test", repeats=10, sites=[site])
    baselines, fixed_seconds = [], []
    for phi in REFERENCE_SCALES:
        t0 = time.perf_counter()
        net, spec, _ = train_fixed_scale(train, None, cfg, phi)
        fixed_seconds.append(time.perf_counter() - t0)
        summ = evaluate_segmenter(NetSegmenter(net, spec, tasks, prep), ds, "test", sites=[site])
        dice = float(summ["mean"]["cord"]["Dice"])
        flops = unet_flops(spec.arch_kwargs, prep.channels, 1, prep.size, "scale", phi)
        latency = next(r["latency_ms"] for r in rows if r["scale"] == phi)  # same architecture at this φ
        baselines.append({"scale": phi, "flops": flops, "latency_ms": latency, "dice": {"cord": dice}})
    fig = front_figure(
        rows,
        out_dir / "front.png",
        f"one scale hypernetwork vs fixed-φ networks (site {site} test)",
        baselines,
    )
    by_phi = {b["scale"]: b["dice"]["cord"] for b in baselines}
    table = [
        {
            "φ": r["scale"],
            "GFLOPs": round(r["flops"] / 1e9, 4),
            "CPU latency ms": r["latency_ms"],
            "hypernetwork Dice": r["dice"]["cord"],
            "fixed-φ network Dice": by_phi.get(r["scale"], ""),
        }
        for r in rows
    ]
    log(
        f"hyper: one run {hyper_seconds:.0f}s vs {sum(fixed_seconds) / len(fixed_seconds):.0f}s per fixed network; "
        + ", ".join(
            f"φ={p:g}: {by_phi[p]:.3f} fixed vs {next(r['dice']['cord'] for r in rows if r['scale'] == p):.3f}"
            for p in REFERENCE_SCALES
        )
    )
    report.section(
        "Hypernetworks: one run, every accuracy-cost point (docs/hyper.md)",
        f"One hypernetwork (MIP parametrization) trained {steps} steps with a random φ per batch gives "
        "the weights of a scale-space U-Net for any φ in [0.25, 0.75] (each level resized by φ instead of "
        f"2). Training took {hyper_seconds:.0f} s; a network for one fixed φ took "
        f"{sum(fixed_seconds) / len(fixed_seconds):.0f} s. Test Dice of site {site}'s cord, exact FLOPs "
        "and CPU latency per φ; a fixed-φ network (φ = 0.5) trained with the same steps for reference. Tiny "
        "network, one seed: the study with seeds and five fixed-φ networks is benchmarks/hyper_bench.py (docs/benchmarks.md).",
    )
    report.figure(fig, "hyper_front")
    report.table(table, caption=f"test subjects of site {site}; one seed")
    return {"rows": table, "hyper_seconds": hyper_seconds, "fixed_seconds": fixed_seconds}
