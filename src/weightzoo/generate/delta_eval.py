"""`generate eval` for delta generators: what generated deltas are worth next to the base, the zoo's
best checkpoint, soups and the noisy-nearest baseline, measured on the dataset's TEST subjects.

Every choice (the zoo's best checkpoint, the greedy soup, best-of-N) uses VALIDATION subjects; the test
subjects only score. One generator per seed; numbers are per generator, reported as mean ± sd.

  seen     per (task of the base, site of the zoo): base alone, zoo best (val-selected final checkpoint
           of a train/val-split fine-tune), uniform and greedy soups of the generator's subset, generated
           one-shot (from 8 unlabelled training images of the site) and best-of-N on val, and the
           noisy-nearest baseline (Zeng et al. 2025): the val-best training delta plus Gaussian noise as
           far from it as the generated sample is from its nearest training delta.
  unseen   per (task, site of the dataset that no zoo run saw): base alone, generated from 8 unlabelled
           images, generated with the site unknown.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from weightzoo.data.raw import RawDataset
from weightzoo.evaluate.report import Report
from weightzoo.fileio import atomic_write_json
from weightzoo.generate.delta import delta_runs
from weightzoo.generate.delta_sample import DeltaGenerator
from weightzoo.generate.evaluate import Scorer, fmt
from weightzoo.generate.site_embedding import dataset_site_images
from weightzoo.segmenter import NetSegmenter
from weightzoo.zoo.soup import make_soup
from weightzoo.zoo.store import Zoo


def final_checkpoint(zoo: Zoo, run: Any) -> Any:
    """A run's last checkpoint."""
    return max(zoo.checkpoints(run_id=run.run_id), key=lambda c: c.step)


def val_score(zoo: Zoo, run: Any) -> float:
    """Mean val Dice of a run's last checkpoint over its tasks (-inf when none is recorded)."""
    c = final_checkpoint(zoo, run)
    vals = [c.metrics.get(t, {}).get("val_dice") for t in run.tasks]
    vals = [v for v in vals if v is not None]
    return float(np.mean(vals)) if vals else -math.inf


def evaluate_delta_generators(
    generators: Sequence[str | Path],
    zoo_path: str | Path,
    dataset: str | Path,
    out: str | Path,
    candidates: int = 8,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Score delta generators (one per seed) on the TEST subjects; writes summary.json and report.html."""
    out = Path(out)
    gens = [DeltaGenerator.load(g) for g in generators]
    g0 = gens[0]
    zoo, ds = Zoo(zoo_path), RawDataset.open(dataset)
    scorer = Scorer(ds, g0.prep)
    bid, subset, tasks = g0.base.base_id, g0.meta["subset"], list(g0.meta["tasks"])

    def test(state: dict[str, torch.Tensor], ts: list[str], site: str) -> float:
        seg = NetSegmenter(
            g0.network(state, ts), g0.base.spec.with_classes(len(ts)), ts, g0.prep, "x", 0.0, "cpu"
        )
        return scorer.dice(seg, "test", site)[ts[0]]

    runs = [r for sp in ("train", "val") for r in delta_runs(zoo, bid, "all", sp)]
    zoo_sites = sorted({s for r in runs for s in r.sites})
    seen_rows, unseen_rows = [], []
    for task in tasks:
        for site in zoo_sites:
            mine = [r for r in runs if r.tasks == [task] and r.sites == [site]]
            sub = [r for r in mine if r.split == "train" and r.config.get("trainable", "all") == subset]
            if not mine or not sub:
                continue
            row: dict[str, Any] = {"task": task, "site": site}
            row["base"] = test(g0.base.restricted([task])[1], [task], site)
            row["zoo best (val)"] = test(
                zoo.load(final_checkpoint(zoo, max(mine, key=lambda r: val_score(zoo, r)))), [task], site
            )
            for method in ("uniform", "greedy"):
                soup = make_soup(zoo, [task], site, method=method, trainable=subset, dataset=ds, base_id=bid)
                row[f"{method} soup"] = test(soup.state, [task], site)
            nearest = g0.layout.run_vector(
                zoo.load(final_checkpoint(zoo, max(sub, key=lambda r: val_score(zoo, r)))), [task]
            )
            train_vecs = [g0.layout.run_vector(zoo.load(final_checkpoint(zoo, r)), [task])[0] for r in sub]
            one, best, noisy = [], [], []
            for i, g in enumerate(gens):
                emb = g.embed_images(dataset_site_images(ds, site, g.prep, n=8, seed=i))
                res = g.sample([task], emb, candidates=candidates, seed=i)
                one.append(test(res.states[0], [task], site))
                pick, _ = g.select_on_val(res, ds, site)
                best.append(test(res.states[pick], [task], site))
                d = g.layout.run_vector(res.states[0], [task])[0]
                sigma = min(float((d - v).norm()) for v in train_vecs) / math.sqrt(g.layout.numel)
                noise = torch.randn(g.layout.numel, generator=torch.Generator().manual_seed(i)) * sigma
                noisy.append(test(g.layout.state(nearest[0] + noise * nearest[1], [task]), [task], site))
            row.update(
                {
                    "generated one-shot": one,
                    f"generated best-of-{candidates} (val)": best,
                    "noisy nearest": noisy,
                }
            )
            seen_rows.append(row)
            log(f"{task}@{site}: zoo best {row['zoo best (val)']:.3f} · generated {fmt(one)}")
        for site in [s for s in ds.sites() if s not in zoo_sites]:
            row = {"task": task, "site": site, "base": test(g0.base.restricted([task])[1], [task], site)}
            imgs, unknown = [], []
            for i, g in enumerate(gens):
                emb = g.embed_images(dataset_site_images(ds, site, g.prep, n=8, seed=i))
                imgs.append(test(g.sample([task], emb, seed=i).states[0], [task], site))
                unknown.append(test(g.sample([task], None, seed=i).states[0], [task], site))
            row.update({"generated (8 unlabelled images)": imgs, "generated (site unknown)": unknown})
            unseen_rows.append(row)
            log(f"{task}@{site} (unseen): base {row['base']:.3f} · generated {fmt(imgs)}")
    res = {
        "generators": [str(g) for g in generators],
        "zoo": str(zoo_path),
        "dataset": str(dataset),
        "seen": seen_rows,
        "unseen": unseen_rows,
    }
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "summary.json", res)
    rep = Report(out, "Delta generators: test Dice")
    rep.section(
        "Zoo sites", "Selections on validation subjects; test subjects only score. ± = sd over generators."
    )
    rep.table([{k: fmt(v) if isinstance(v, list) else v for k, v in r.items()} for r in seen_rows])
    if unseen_rows:
        rep.section("Sites no zoo run saw", "Generated from 8 unlabelled training images of the site.")
        rep.table([{k: fmt(v) if isinstance(v, list) else v for k, v in r.items()} for r in unseen_rows])
    rep.write()
    return res
