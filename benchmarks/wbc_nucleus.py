"""Foundation check on real data: a `small` model trained on WBC site "Dataset1" nucleus, test Dice per site.

    python benchmarks/wbc_nucleus.py [--wbc ../shared/data/wbc] [--steps 400] [--work /tmp/wbc_bench]

Imports the white-blood-cell data (two sites) as an nnU-Net raw dataset, trains with nnU-Net's recipe
on Dataset1's training subjects (validation on its val subjects), and evaluates on the test subjects of
both sites. Prints a table; the goal (issue 2) is Dice >= 0.90 on Dataset1's test subjects.
"""

from __future__ import annotations

import argparse
import platform
import shutil
import time
from pathlib import Path

import torch

from weightzoo.data.importers import import_wbc
from weightzoo.evaluate.summary import evaluate_segmenter, summary_line
from weightzoo.train.config import TrainConfig
from weightzoo.train.loop import train_model

DEFAULT_WBC = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "wbc"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--wbc", type=Path, default=DEFAULT_WBC)
    ap.add_argument("--work", type=Path, default=Path("/tmp/wbc_bench"))
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if not args.wbc.is_dir():
        raise SystemExit(f"{args.wbc}: WBC data not found — pass --wbc PATH (see ../shared/data/README.md)")
    shutil.rmtree(args.work, ignore_errors=True)
    t0 = time.perf_counter()
    ds = import_wbc(args.wbc, args.work / "data")
    t_import = time.perf_counter() - t0
    cfg = TrainConfig(
        tasks=["nucleus"],
        preset="small",
        steps=args.steps,
        batch_size=16,
        seed=args.seed,
        size=(args.size, args.size),
        normalization="rgb",
        device="auto",
    )
    res = train_model(ds, cfg, args.work / "model", sites=["Dataset1"], progress=False)
    summ = evaluate_segmenter(res.segmenter, ds, split="test")
    print(f"# WBC nucleus, small preset, trained on Dataset1 — {time.strftime('%Y-%m-%d')}")
    print(f"# device: {platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(
        f"# import {t_import:.1f}s, train {res.seconds:.1f}s ({args.steps} steps, batch 16, {args.size} px, seed {args.seed})"
    )
    print("| test site | cases | Dice (mean ± sd) | HD95 px |")
    print("|---|---|---|---|")
    for site in summ["per_site"]:
        n = summ["per_site_n_cases"][site]
        print(
            f"| {site} | {n} | {summary_line(summ, 'nucleus', 'Dice', site)} | {summary_line(summ, 'nucleus', 'HD95', site)} |"
        )


if __name__ == "__main__":
    main()
