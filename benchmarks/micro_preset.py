"""Does the micro preset segment when trained normally? Test Dice per seed, micro vs tiny, 32 px phantoms.

Each (preset, task, seed) is trained with `weightzoo train`'s recipe (SGD, lr 1e-2, batch 8, 500
steps; `--optimizer adam --lr 0.01 --batch-size 4 --steps 300` is the scaling study's recipe) on
site A of a 48-subject, 32 px phantom dataset and scored on its TEST subjects.

    python benchmarks/micro_preset.py                    # micro and tiny, cord and canal, 5 seeds
    python benchmarks/micro_preset.py --seeds 15 --tasks cord
"""

from __future__ import annotations

import argparse
import datetime
import tempfile
from pathlib import Path

import numpy as np
import torch

from weightzoo.data.slices import Preprocessing
from weightzoo.data.synth import make_phantom_dataset
from weightzoo.generate.evaluate import Scorer
from weightzoo.nets.unet import ArchSpec, build_network, count_parameters
from weightzoo.train.config import TrainConfig
from weightzoo.train.loop import train_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["micro", "tiny"])
    ap.add_argument("--tasks", nargs="+", default=["cord", "canal"])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--optimizer", default="sgd")
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=500)
    args = ap.parse_args()
    print(
        f"date: {datetime.date.today().isoformat()} · torch {torch.__version__} · CPU, "
        f"{torch.get_num_threads()} threads · {args.optimizer} lr {args.lr or 'default'}, batch "
        f"{args.batch_size}, {args.steps} steps, 32 px, site A, test subjects"
    )
    print("| preset | params | task | test Dice per seed | median | seeds ≥ 0.85 |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        ds = make_phantom_dataset(
            Path(tmp) / "data", sites=1, subjects_per_site=48, size=32, n_slices=8, seed=0
        )
        scorer = Scorer(ds, Preprocessing(size=(32, 32), channels=1))
        for preset in args.presets:
            n = count_parameters(build_network(ArchSpec.preset(preset)))
            for task in args.tasks:
                dice = []
                for seed in range(args.seeds):
                    cfg = TrainConfig(
                        tasks=[task],
                        preset=preset,
                        steps=args.steps,
                        batch_size=args.batch_size,
                        optimizer=args.optimizer,
                        lr=args.lr,
                        size=(32, 32),
                        seed=seed,
                        val_every=args.steps,
                    )
                    res = train_model(ds, cfg, Path(tmp) / f"{preset}-{task}-{seed}", progress=False)
                    dice.append(scorer.dice(res.segmenter, "test", None)[task])
                d = np.array(dice)
                print(
                    f"| {preset} | {n:,} | {task} | {', '.join(f'{v:.3f}' for v in d)} | "
                    f"{np.median(d):.3f} | {int((d >= 0.85).sum())} of {len(d)} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
