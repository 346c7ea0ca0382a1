"""The `weightzoo demo` section on generated weights: a tiny generator trained on the demo's tiny zoo,
and one generated network's Dice next to the zoo's best checkpoint (reported as measured, also when
worse). Called by weightzoo.demo after the zoo part; sized to ~40 s on 2 CPU cores."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from weightzoo.data.raw import RawDataset
from weightzoo.data.slices import Preprocessing
from weightzoo.generate.evaluate import Scorer, best_checkpoint, zoo_segmenter
from weightzoo.generate.sample import Generator, Start
from weightzoo.generate.train import GenTrainConfig, train_generator
from weightzoo.zoo.store import Zoo

DEMO_SEED = 4242  # the generated network's initialisation: not a zoo seed


def _steps_for(zoo: Zoo, seconds: float, batch_size: int) -> int:
    """Generator steps that fit `seconds`, from timing 3 steps of the tiny model on a random batch."""
    from weightzoo.generate.diffusion import DiffusionConfig, ParamDiffusion
    from weightzoo.generate.train import select_runs
    from weightzoo.generate.vectors import TaskLayout

    runs, _, body = select_runs(zoo, "train", GenTrainConfig())
    layout = TaskLayout(body, sorted({t for r in runs for t in r.tasks}))
    model = ParamDiffusion(layout.layout, len(layout.tasks), 1, DiffusionConfig.preset("tiny"))
    opt = torch.optim.AdamW(model.parameters())
    x = torch.randn(batch_size, layout.numel)
    m = torch.rand(batch_size, len(layout.tasks))
    t0 = time.perf_counter()
    for _ in range(3):
        loss = (
            model(x, torch.zeros(batch_size, dtype=torch.long), x, m, m, torch.ones(batch_size, 1))
            .pow(2)
            .mean()
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
    per_step = 1.3 * (time.perf_counter() - t0) / 3  # + batches, EMA and logging
    return int(max(60, min(1500, seconds / max(per_step, 1e-3))))


def demo_generate(
    out_dir: str | Path,
    zoo: Zoo | str | Path,
    ds: RawDataset,
    report: Any | None = None,
    log: Callable[[str], None] = print,
    seconds_budget: float = 40.0,
) -> dict[str, Any]:
    """Train a tiny generator on `zoo` (into out_dir/generator), generate one network for the task and
    site with the zoo's best checkpoint, and compare their test Dice. Adds a section to `report`
    (a weightzoo.evaluate.report.Report) when given; returns the numbers."""
    t_all = time.perf_counter()
    zoo = zoo if isinstance(zoo, Zoo) else Zoo(zoo)
    out_dir = Path(out_dir)
    batch = 16
    steps = _steps_for(zoo, 0.6 * seconds_budget, batch)
    log(f"generator: training a tiny diffusion model on the zoo ({steps} steps)")
    res = train_generator(
        zoo, out_dir / "generator", GenTrainConfig(steps=steps, batch_size=batch, warmup=min(100, steps // 5))
    )
    gen = Generator.load(out_dir / "generator", "cpu")
    prep = Preprocessing.from_dict(gen.meta["preprocessing"])
    scorer = Scorer(ds, prep)
    best, task, site = None, None, None
    for t in gen.tasks:
        for s in gen.sites:
            b = best_checkpoint(zoo, t, s)
            v = b.metrics[t].get("val_dice") if b is not None else None
            if v is not None and (best is None or v > best.metrics[task]["val_dice"]):  # type: ignore[index]
                best, task, site = b, t, s
    if best is None or task is None:
        log("generator: the zoo has no single-task training run with a val Dice; nothing to compare")
        return {"seconds": time.perf_counter() - t_all, "generator_steps": res.steps}
    target = float(best.metrics[task]["val_dice"])
    t0 = time.perf_counter()
    r = gen.sample([task], {task: target}, site=site, start=Start.from_init(DEMO_SEED), candidates=4, seed=0)
    sample_s = time.perf_counter() - t0
    ok = [i for i, v in enumerate(r.vectors) if not gen.problems(v, [task])]
    val = {i: scorer.dice(gen.segmenter(r.vectors[i], [task]), "val", site)[task] for i in ok}
    pick = max(val, key=lambda i: -1 if math.isnan(val[i]) else val[i]) if val else None
    gen_test = (
        scorer.dice(gen.segmenter(r.vectors[pick], [task]), "test", site)[task]
        if pick is not None
        else math.nan
    )
    zoo_test = scorer.dice(zoo_segmenter(zoo, best, prep), "test", site)[task]
    # the mode that works with small zoos: one step from a checkpoint of a run the generator never saw
    held = [
        c
        for c in zoo.checkpoints(task=task, site=site, kind="random")
        if c.split != "train" and len(c.tasks) == 1 and c.sites == [site]
    ]
    ckpt_row = None
    if held:
        c = held[len(held) // 2]
        before = scorer.dice(zoo_segmenter(zoo, c, prep), "test", site)[task]
        rc = gen.sample([task], {task: target}, site=site, start=Start.from_zoo(zoo, c.ckpt_id), seed=0)
        bad = gen.problems(rc.vectors[0], [task])
        after = math.nan if bad else scorer.dice(gen.segmenter(rc.vectors[0], [task]), "test", site)[task]
        ckpt_row = {"checkpoint": c.ckpt_id, "before_test_dice": before, "after_test_dice": after}
    if pick is not None:
        gen.save(
            r.vectors[pick],
            [task],
            out_dir / "generated_net",
            sample_s,
            {"target_dice": {task: target}, "site": site},
        )
    out = {
        "task": task,
        "site": site,
        "target_val_dice": target,
        "zoo_best_checkpoint": best.ckpt_id,
        "zoo_best_test_dice": zoo_test,
        "generated_val_dice": val.get(pick, math.nan) if pick is not None else math.nan,
        "generated_test_dice": gen_test,
        "generator_steps": res.steps,
        "generator_seconds": res.seconds,
        "sample_seconds": sample_s,
        "from_held_out_checkpoint": ckpt_row,
        "seconds": time.perf_counter() - t_all,
    }
    verdict = (
        (
            "matches or beats"
            if gen_test >= zoo_test
            else f"is {100 * (zoo_test - gen_test):.1f} Dice points below"
        )
        if math.isfinite(gen_test) and math.isfinite(zoo_test)
        else "could not be compared with"
    )
    log(
        f"generator: generated {task}@{site} test Dice {gen_test:.3f} vs zoo best {zoo_test:.3f} ({sample_s:.1f} s to sample 4)"
    )
    if report is not None:
        report.section(
            "Generated weights",
            f"A tiny diffusion generator ({res.steps} steps, {res.seconds:.0f} s) was trained on the zoo's training runs, "
            f"then asked for a {task} network for site {site} with the zoo's best val Dice ({target:.3f}) from a fresh "
            f"initialisation (seed {DEMO_SEED}, not a zoo seed); of 4 candidates the best on validation was kept. "
            f"The generated network {verdict} the zoo's best checkpoint on the test subjects. With a zoo this "
            "small, one step from a fresh initialisation is not expected to work (docs/generate.md); one step "
            "from a checkpoint of a run the generator never saw is shown below it. "
            "A demo-sized generator is far from converged; see docs/generate.md for what to expect.",
        )
        report.table(
            [
                {
                    "network": f"zoo best checkpoint ({best.ckpt_id})",
                    "val Dice": target,
                    "test Dice": zoo_test,
                },
                {
                    "network": "generated from a fresh init (best of 4 on val)",
                    "val Dice": out["generated_val_dice"],
                    "test Dice": gen_test,
                },
                *_checkpoint_rows(ckpt_row),
            ],
            caption=f"{task} on site {site}",
        )
    return out


def _checkpoint_rows(row: dict[str, Any] | None) -> list[dict[str, Any]]:
    if row is None:
        return []
    return [
        {"network": f"held-out run's checkpoint {row['checkpoint']}", "test Dice": row["before_test_dice"]},
        {"network": "generated in one step from that checkpoint", "test Dice": row["after_test_dice"]},
    ]
