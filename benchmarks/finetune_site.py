"""Fine-tune a base on one site with labels, k steps, several seeds: the labelled baseline of issue 10.

    python benchmarks/finetune_site.py --base W/base --dataset W/data/Dataset501_WBC --site Dataset2 \
        --tasks nucleus --steps 100 --seeds 5

Prints the test Dice of each seed and mean ± sd. The recipe is the fine-tune zoo's (Adam 1e-3, batch 8,
all weights), so the numbers compare with `generate eval` on the same dataset.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

from weightzoo.data.raw import RawDataset
from weightzoo.data.slices import Preprocessing
from weightzoo.zoo.grid import Grid
from weightzoo.zoo.runs import load_zoo_data, train_sequential


def finetune(
    ds: RawDataset, base: Path, tasks: list[str], site: str, steps: int, seed: int, trainable: str = "all"
) -> tuple[dict[str, torch.Tensor], float]:
    """A fine-tune of the base with labels (the zoo's recipe): its final state and seconds."""
    grid = {
        "from": str(base),
        "tasks": [tasks],
        "sites": [site],
        "seeds": [seed],
        "steps": steps,
        "optimizer": "adam",
        "lr": 1e-3,
        "batch_size": 8,
        "checkpoints": 0,
        "trainable": trainable,
    }
    plan = Grid(grid).expand(ds)[0]
    c = plan.config
    prep = Preprocessing(c.normalization, tuple(c.size), c.axis, ds.n_channels)
    data = load_zoo_data(ds, [plan], prep).run_data(plan, torch.device("cpu"))
    got: dict[int, Any] = {}
    t0 = time.perf_counter()
    train_sequential(plan, data, torch.device("cpu"), lambda ck: got.update({ck.step: ck.state}), skip=[0])
    return got[steps], time.perf_counter() - t0


def main() -> None:
    from weightzoo.generate.evaluate import Scorer, fmt
    from weightzoo.nets.unet import build_network, load_real_state_dict
    from weightzoo.segmenter import NetSegmenter
    from weightzoo.zoo.base import load_base

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", type=Path, required=True)
    p.add_argument("--dataset", type=Path, required=True)
    p.add_argument("--site", required=True)
    p.add_argument("--tasks", required=True, help="comma-separated; one run per task")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    ds, base = RawDataset.open(a.dataset), load_base(a.base)
    prep = Preprocessing.from_dict({**base.preprocessing, "channels": ds.n_channels})
    scorer = Scorer(ds, prep)
    for task in a.tasks.split(","):
        vals = []
        for seed in range(a.seeds):
            state, _ = finetune(ds, a.base, [task], a.site, a.steps, seed)
            spec = base.spec.with_classes(1)
            net = load_real_state_dict(build_network(spec), state)
            vals.append(
                scorer.dice(NetSegmenter(net, spec, [task], prep, "ft", 0.0, "cpu"), "test", a.site)[task]
            )
        print(
            f"{task}@{a.site}: base + {a.steps} steps, test Dice {fmt(vals)} ({', '.join(f'{v:.4f}' for v in vals)})"
        )


if __name__ == "__main__":
    main()
