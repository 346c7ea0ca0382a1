"""The `weightzoo demo` section on models from ONE base: a base on three sites, a zoo of its norm+seg
fine-tunes, their soups, and the delta generator — next to the zoo's best checkpoint, and for a site
the base and zoo never saw, from 8 unlabelled images. Sized to ~60 s on 2 CPU cores; every figure is
reported as measured (also when a route is worse)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from weightzoo.data.raw import RawDataset
from weightzoo.data.slices import Preprocessing
from weightzoo.generate.delta import DeltaGenConfig, train_delta_generator
from weightzoo.generate.delta_sample import DeltaGenerator
from weightzoo.generate.evaluate import Scorer
from weightzoo.generate.site_embedding import dataset_site_images
from weightzoo.nets.unet import build_network, load_real_state_dict
from weightzoo.segmenter import NetSegmenter
from weightzoo.train.config import TrainConfig
from weightzoo.train.loop import train_model
from weightzoo.zoo.build import build_zoo
from weightzoo.zoo.soup import make_soup
from weightzoo.zoo.store import Zoo

TASKS = ["cord", "gm", "canal"]
SIZE = 32


def demo_delta(
    out_dir: str | Path,
    ds: RawDataset,
    report: Any | None = None,
    log: Callable[[str], None] = print,
    seconds_budget: float = 60.0,
) -> dict[str, Any]:
    """Base → fine-tune zoo → soups and generated deltas for cord; a held-out site from images alone."""
    t_all = time.perf_counter()
    out_dir = Path(out_dir) / "base_route"
    sites = ds.sites()
    seen, unseen = sites[:-1], sites[-1]
    scale = max(0.25, seconds_budget / 60.0)
    base_steps, ft_steps = int(300 * scale), int(40 * scale)
    log(f"base route: a {'+'.join(TASKS)} base on sites {', '.join(seen)} ({base_steps} steps, {SIZE} px)")
    cfg = TrainConfig(
        tasks=TASKS,
        preset="small",
        steps=base_steps,
        batch_size=8,
        optimizer="adam",
        size=(SIZE, SIZE),
        seed=0,
    )
    train_model(ds, cfg, out_dir / "base", sites=seen, progress=False)
    grid = {
        "from": str(out_dir / "base"),
        "tasks": ["cord", TASKS],
        "sites": seen,
        "seeds": 3,
        "trainable": "norm_seg",
        "optimizer": "adam",
        "lr": 3e-3,
        "steps": ft_steps,
        "batch_size": 8,
        "checkpoints": 1,
        "run_split": {"train": 0.7, "val": 0.3, "test": 0.0},
    }
    build_zoo(ds, grid, out_dir / "zoo", device="cpu", progress=False, log=lambda m: None)
    gen_dir = out_dir / "generator"
    train_delta_generator(
        out_dir / "zoo",
        gen_dir,
        DeltaGenConfig(steps=int(400 * scale), hidden=256, depth=2),
        log=lambda m: None,
    )
    gen = DeltaGenerator.load(gen_dir)
    prep = Preprocessing("zscore", (SIZE, SIZE), 2, ds.n_channels)
    scorer = Scorer(ds, prep)

    def test(state: dict[str, torch.Tensor], tasks: list[str], site: str) -> float:
        spec = gen.base.spec.with_classes(len(tasks))
        seg = NetSegmenter(
            load_real_state_dict(build_network(spec), state), spec, tasks, prep, "x", 0.0, "cpu"
        )
        d = scorer.dice(seg, "test", site)
        return float(sum(d.values()) / len(d))

    zoo = Zoo(out_dir / "zoo")
    rows, site = [], seen[0]
    cands = [
        c
        for c in zoo.checkpoints(task="cord", site=site, kind="final")
        if c.tasks == ["cord"] and c.split != "test"
    ]
    best = max(cands, key=lambda c: c.metrics["cord"].get("val_dice") or -1.0)
    rows.append(
        {"network": "base alone", "test Dice": test(gen.base.restricted(["cord"])[1], ["cord"], site)}
    )
    rows.append(
        {
            "network": f"zoo best fine-tune ({best.ckpt_id}, val-selected)",
            "test Dice": test(zoo.load(best), ["cord"], site),
        }
    )
    for method in ("uniform", "greedy"):
        soup = make_soup(zoo, ["cord"], site, method=method, dataset=ds)
        rows.append(
            {
                "network": f"{method} soup of {len(soup.chosen)} fine-tune(s)",
                "test Dice": test(soup.state, ["cord"], site),
            }
        )
    t0 = time.perf_counter()
    res = gen.sample(["cord"], gen.embed_images(dataset_site_images(ds, site, prep)), candidates=4, seed=0)
    pick, _ = gen.select_on_val(res, ds, site)
    sample_s = time.perf_counter() - t0
    rows.append(
        {"network": "generated delta (best of 4 on val)", "test Dice": test(res.states[pick], ["cord"], site)}
    )
    gen.save(res.states[pick], ["cord"], out_dir / "generated_net", sample_s, {"site": site})
    # a site the base and the zoo never saw: 8 unlabelled images, no labels, no site id
    emb = gen.embed_images(dataset_site_images(ds, unseen, prep, n=8))
    new = gen.sample(TASKS, emb, candidates=1, seed=0)
    unseen_rows = [
        {"network": "base alone", "test Dice (mean of 3 tasks)": test(gen.base.state, TASKS, unseen)},
        {
            "network": "generated from 8 unlabelled images",
            "test Dice (mean of 3 tasks)": test(new.states[0], TASKS, unseen),
        },
    ]
    out = {
        "site": site,
        "unseen_site": unseen,
        "rows": rows,
        "unseen_rows": unseen_rows,
        "sample_seconds": sample_s,
        "seconds": time.perf_counter() - t_all,
    }
    log("base route: " + "; ".join(f"{r['network']} {r['test Dice']:.3f}" for r in rows))
    if report is not None:
        report.section(
            "Models from one base: fine-tunes, soups, generated deltas",
            f"One cord+gm+canal base (small U-Net, {base_steps} steps, {SIZE} px) trained on sites "
            f"{', '.join(seen)}; a zoo of its fine-tunes (norm + seg layers only, 3 seeds, {ft_steps} steps); "
            "model soups of those fine-tunes; and a diffusion model over their deltas from the base, "
            "conditioned on the task set and on a site embedding computed from unlabelled images by the "
            f"base's encoder. Sampling 4 networks took {sample_s:.2f} s. Demo-sized: "
            "docs/generate.md has the benchmark with 5 seeds.",
        )
        report.table(rows, caption=f"cord on site {site} (test subjects)")
        report.table(unseen_rows, caption=f"site {unseen}, never seen by the base or the zoo")
    if not all(math.isfinite(r["test Dice"]) for r in rows):
        log("base route: some test Dice are undefined (no foreground in the test subjects)")
    return out
