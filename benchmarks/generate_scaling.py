"""Does one-shot generation from a random init appear as the zoo grows? G.pt's question at our scale.

One micro-preset zoo (32 px phantom cord, one site) grows through the sizes asked for (default 100,
300, 1000, 3000 runs): runs vary the seed and the learning rate (4 values, Adam, batch 4, 300 steps, 4 random
checkpoints + init + final each), built batched. At each size, before the zoo grows further, the
existing G.pt-style generator (`weightzoo.generate`, tiny preset, the same recipe at every size) is
trained with `--gen-seeds` seeds on the zoo's training runs and evaluated on the dataset's TEST
subjects (`evaluate_generators`, parts best + alignment):

  zoo best            test Dice of the zoo's val-best checkpoint
  one-shot            a network generated in one step from a fresh random init (an unseen seed),
                      prompted with the zoo best's val Dice; best-of-8 picks on val
  target 1.0          the same, prompted with Dice 1.0
  noisy nearest       (Zeng et al. 2025) the zoo best plus Gaussian noise as far from it as the
                      one-shot network is from its nearest training checkpoint
  R² (fresh init)     target vs achieved test Dice over targets 0.2..1.0, against the identity line

Resumable: every stage leaves its result in WORK (zoo, generators, one JSON per size); run the same
command again after a kill. `--tables-only` prints the tables and the trend from WORK.

    python benchmarks/generate_scaling.py --work /tmp/scaling
    python benchmarks/generate_scaling.py --work /tmp/scaling --sizes 100 300 --gen-seeds 5
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from weightzoo.data.raw import RawDataset
from weightzoo.data.slices import Preprocessing
from weightzoo.data.synth import make_phantom_dataset
from weightzoo.fileio import atomic_write_json
from weightzoo.generate.evaluate import UNSEEN_SEED, Scorer, best_checkpoint, evaluate_generators
from weightzoo.generate.sample import Generator, Start
from weightzoo.generate.train import GenTrainConfig, train_generator
from weightzoo.nets.unet import ArchSpec, build_network, count_parameters
from weightzoo.zoo.build import build_zoo
from weightzoo.zoo.store import Zoo

LRS = [0.003, 0.005, 0.01, 0.015]  # Adam: 300 steps of batch 4 train the micro net reliably
TASK, SITE = "cord", "A"


def grid(n_runs: int, steps: int, checkpoints: int) -> dict[str, Any]:
    """n_runs = len(LRS) x seeds; a smaller zoo's runs are a subset of a larger one's."""
    return {
        "tasks": [TASK],
        "sites": [SITE],
        "seeds": math.ceil(n_runs / len(LRS)),
        "preset": "micro",
        "optimizer": "adam",
        "lr": LRS,
        "steps": steps,
        "batch_size": 4,
        "checkpoints": checkpoints,
        "size": [32, 32],
    }


def noisy_nearest(
    g: Generator,
    scorer: Scorer,
    vec: torch.Tensor,
    train_vecs: torch.Tensor,
    best_vec: torch.Tensor,
    seed: int,
) -> float:
    """Test Dice of the zoo best + Gaussian noise at the one-shot vector's distance to its nearest
    training checkpoint (per-parameter sigma = distance / sqrt(numel))."""
    dist = float(torch.cdist(vec[None], train_vecs).min())
    noise = (
        torch.randn(vec.numel(), generator=torch.Generator().manual_seed(seed))
        * dist
        / math.sqrt(vec.numel())
    )
    noisy = (best_vec + noise) * g.layout.mask([TASK])
    return scorer.dice(g.segmenter(noisy, [TASK]), "test", SITE)[TASK]


def stage(work: Path, ds: RawDataset, n: int, args: argparse.Namespace, log) -> dict[str, Any]:
    out = work / f"size-{n}.json"
    if out.exists():
        return json.loads(out.read_text())
    t = time.perf_counter()
    res = build_zoo(
        ds,
        grid(n, args.steps, args.checkpoints),
        work / "zoo",
        mode="batched",
        parallel=args.parallel,
        device=args.device,
        progress=False,
        log=log,
    )
    build_s = time.perf_counter() - t
    gens, gen_s = [], []
    zoo = Zoo(work / "zoo")
    n_train = len([r for r in zoo.runs(split="train")])
    for s in range(args.gen_seeds):
        t = time.perf_counter()
        folder = work / f"gen-{n}-s{s}"
        train_generator(
            zoo,
            folder,
            GenTrainConfig(preset="tiny", steps=args.gen_steps, seed=s, device=args.device),
            log=None,
        )
        gens.append(folder)
        gen_s.append(time.perf_counter() - t)
    ev = evaluate_generators(
        gens,
        zoo,
        ds,
        work / f"eval-{n}",
        candidates=8,
        parts=("best", "alignment"),
        device="cuda" if args.device == "cuda" else "cpu",
        log=log,
    )
    # noisy nearest, per generator, next to its one-shot sample
    g0 = Generator.load(gens[0], "cpu")
    scorer = Scorer(ds, Preprocessing.from_dict(g0.meta["preprocessing"]))
    best = best_checkpoint(zoo, TASK, SITE)
    best_val = float(best.metrics[TASK]["val_dice"])
    train_vecs = torch.stack(
        [g0.layout.embed(zoo.load(c), [TASK])[0] for c in zoo.checkpoints(split="train")]
    )
    best_vec = g0.layout.embed(zoo.load(best), [TASK])[0]
    noisy = []
    for gi, folder in enumerate(gens):
        g = Generator.load(folder, "cpu")
        seed = UNSEEN_SEED + gi
        r = g.sample([TASK], {TASK: best_val}, site=SITE, start=Start.from_init(seed), seed=seed)
        noisy.append(noisy_nearest(g, scorer, r.vectors[0], train_vecs, best_vec, gi))
    row = ev["best"][0]
    al = ev["alignment"]["fresh init"]
    finals = [float(c.metrics[TASK]["val_dice"]) for c in zoo.checkpoints(split="train", kind="final")]
    result = {
        "runs": n,
        "runs_built": res.runs_planned,
        "train_runs": n_train,
        "checkpoints": len(zoo.checkpoints()),
        "build_seconds": round(build_s, 1),
        "build_seconds_this_stage": round(res.seconds, 1),
        "gen_seconds": [round(s, 1) for s in gen_s],
        "zoo_best_val": best_val,
        "zoo_best_test": row["zoo best test"],
        "final_val_dice_median": float(np.median(finals)),
        "final_val_dice_frac_above_0.8": float(np.mean(np.array(finals) > 0.8)),
        "one_shot": row["generated one-shot"],
        "best_of_8": row["generated best-of-8 (val)"],
        "target_1": row["generated, target 1.0"],
        "noisy_nearest": noisy,
        "r2_fresh_init": al["r2_per_generator"],
        "pearson_fresh_init": al["pearson_r"],
        "alignment_points": [p for p in ev["alignment"]["points"] if p["start"] == "fresh init"],
    }
    atomic_write_json(out, result)
    zoo.close()
    return result


def ms(v: list[float]) -> str:
    a = np.array([x if x is not None else np.nan for x in v], dtype=float)
    ok = a[np.isfinite(a)]
    if not len(ok):
        return "NaN"
    bad = len(a) - len(ok)
    return f"{ok.mean():.3f} ± {ok.std():.3f}" + (f" ({bad} rejected)" if bad else "")


def med(v: list[float]) -> str:
    a = np.array([x if x is not None else np.nan for x in v], dtype=float)
    return f"{np.nanmedian(a):.3g}" if np.isfinite(a).any() else "NaN"


def tables(results: list[dict[str, Any]], n_params: int) -> str:
    lines = [
        "| runs | runs / param | checkpoints | zoo best test | one-shot (init) | best-of-8 (val) | target 1.0 | noisy nearest | R² fresh init (median of generators) | Pearson r (target, achieved) | gap one-shot − best (pts) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        one = np.nanmean(np.array(r["one_shot"], dtype=float))
        lines.append(
            f"| {r['runs']} | {r['runs'] / n_params:.3f} | {r['checkpoints']} | {r['zoo_best_test']:.3f} | {ms(r['one_shot'])} | "
            f"{ms(r['best_of_8'])} | {ms(r['target_1'])} | {ms(r['noisy_nearest'])} | {med(r['r2_fresh_init'])} | "
            f"{r['pearson_fresh_init']:.2f} | "
            f"{100 * (one - r['zoo_best_test']):+.1f} |"
        )
    lines += [
        "",
        "| runs | build s (this stage) | generator train s (mean) | final val Dice, median | finals > 0.8 |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['runs']} | {r['build_seconds_this_stage']:.0f} | {np.mean(r['gen_seconds']):.0f} | "
            f"{r['final_val_dice_median']:.3f} | {100 * r['final_val_dice_frac_above_0.8']:.0f} % |"
        )
    return "\n".join(lines)


def trend(results: list[dict[str, Any]]) -> str:
    """Least-squares lines of the one-shot gap and of R² against log10(runs), and where they would
    reach the issue's goals (gap >= -5 pts, R² >= 0.8) if the lines held."""
    if len(results) < 2:
        return "trend: needs two zoo sizes"
    x = np.log10([r["runs"] for r in results])
    gap = np.array(
        [100 * (np.nanmean(np.array(r["one_shot"], dtype=float)) - r["zoo_best_test"]) for r in results]
    )
    r2 = np.array([np.nanmedian(np.array(r["r2_fresh_init"], dtype=float)) for r in results])
    out = []
    for name, y, goal in (("gap (pts)", gap, -5.0), ("R²", r2, 0.8)):
        ok = np.isfinite(y)
        if name == "R²" and ok.any() and (y[ok] < 0).all():
            out.append(
                "R² < 0 at every size (achieved Dice does not follow the prompt): nothing to extrapolate"
            )
            continue
        if ok.sum() < 2:
            out.append(f"{name}: not enough finite points")
            continue
        slope, icpt = np.polyfit(x[ok], y[ok], 1)
        at = (goal - icpt) / slope if slope > 0 else math.inf
        reach = (
            "never (slope <= 0)"
            if slope <= 0
            else f"~{10**at:,.0f} runs"
            if at < 9
            else f"beyond 10^9 runs (10^{at:.0f}): no usable trend"
        )
        out.append(f"{name} = {icpt:+.2f} {slope:+.2f}·log10(runs); reaches {goal} at {reach}")
    return "trend: " + "; ".join(out)


def figure(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = [r["runs"] for r in results]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.4))
    for key, label in (
        ("one_shot", "one-shot from init"),
        ("best_of_8", "best-of-8 (val)"),
        ("noisy_nearest", "noisy nearest"),
    ):
        m = [np.nanmean(np.array(r[key], dtype=float)) for r in results]
        s = [np.nanstd(np.array(r[key], dtype=float)) for r in results]
        a.errorbar(n, m, yerr=s, marker="o", capsize=3, label=label)
    a.plot(n, [r["zoo_best_test"] for r in results], "k--", marker="s", label="zoo best")
    a.set(xscale="log", xlabel="runs in the zoo", ylabel="test Dice (cord)", ylim=(0, 1))
    a.legend(fontsize=7)
    for r in results:  # prompt alignment: achieved vs asked, one line per zoo size
        pts = r["alignment_points"]
        targets = sorted({p["target"] for p in pts})
        achieved = [np.nanmean([p["achieved"] for p in pts if p["target"] == t]) for t in targets]
        b.plot(targets, achieved, marker="o", label=f"{r['runs']} runs")
    b.plot([0, 1], [0, 1], "k:", label="identity (perfect alignment)")
    b.set(
        xlabel="target Dice (prompt)",
        ylabel="achieved test Dice (fresh init)",
        xlim=(0, 1.05),
        ylim=(0, 1.05),
    )
    b.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True, help="working folder (resumable)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[100, 300, 1000, 3000])
    ap.add_argument("--steps", type=int, default=300, help="training steps per zoo run")
    ap.add_argument("--checkpoints", type=int, default=4, help="random checkpoints per run (+ init + final)")
    ap.add_argument("--parallel", type=int, default=128, help="runs per batched group")
    ap.add_argument("--gen-seeds", type=int, default=5)
    ap.add_argument("--gen-steps", type=int, default=1500)
    ap.add_argument("--device", default="cpu", help="cpu | cuda: where zoo runs and generators train")
    ap.add_argument("--figure", type=Path, default=None, help="also write the figure here (PNG)")
    ap.add_argument("--tables-only", action="store_true")
    args = ap.parse_args()
    n_params = count_parameters(build_network(ArchSpec.preset("micro")))
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    if not args.tables_only:
        root = work / "data" / "Dataset501_Phantom"
        ds = (
            RawDataset.open(root)
            if root.exists()
            else make_phantom_dataset(
                work / "data", sites=1, subjects_per_site=48, size=32, n_slices=8, seed=0
            )
        )
        for n in sorted(args.sizes):
            r = stage(work, ds, n, args, log=lambda s: print(s, flush=True))
            print(
                f"size {n}: zoo best test {r['zoo_best_test']:.3f}, one-shot {ms(r['one_shot'])}, "
                f"R² {ms(r['r2_fresh_init'])}",
                flush=True,
            )
    results = [
        json.loads((work / f"size-{n}.json").read_text())
        for n in sorted(args.sizes)
        if (work / f"size-{n}.json").exists()
    ]
    print(
        f"date: {datetime.date.today().isoformat()} · torch {torch.__version__} · micro preset ({n_params} params), "
        f"32 px phantom cord, site A · {args.gen_seeds} generator seeds"
    )
    print(tables(results, n_params))
    print(trend(results))
    if args.figure is not None and results:
        figure(results, args.figure)
        print(f"figure: {args.figure}")


if __name__ == "__main__":
    main()
