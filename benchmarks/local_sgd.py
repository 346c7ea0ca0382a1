"""Post-local SGD and SlowMo vs synchronous DDP: test Dice vs the sync period H, communication counted.

Every run is a real `torchrun --standalone --nproc-per-node W -m weightzoo train ...` with gloo on this
CPU (W worker processes), on multi-site phantoms (W sites), `cord,gm`, tiny preset at 64 px, Adam
lr 1e-2 (the nnU-Net SGD recipe does not converge in a few hundred steps at this size; see
site_heads.py), global batch 16 (16/W rows per worker), one thread per worker. Per seed and data mode:

    sync        --ddp                        gradients all-reduced every step (the baseline)
    H=h         --local-sgd h                parameters averaged every h steps (no warm-up)
    H=h+SlowMo  --local-sgd h --slowmo 0.5   the same, with outer momentum β = 0.5, α = 1

Data modes: iid (every worker draws its rows of one global batch from all sites, `--split batch`) and
site (each worker holds one site's training subjects only, `--split site`: the consortium case).
Test Dice: per test subject (all sites), mean over subjects, then mean ± sd over seeds. Nothing is
selected on test: every model is its last iterate. Communication: what rank 0 counted (all-reduce
calls and bytes), and ring all-reduce time modelled at 1 and 10 Gbit/s (50 µs latency per round).
SlowMo's gap recovery = (SlowMo − local) / (sync − local), per H and mode.

    python benchmarks/local_sgd.py                                   # 4 workers, 3 seeds, H 1,4,16,64
    python benchmarks/local_sgd.py --quick                           # 2 workers, 1 seed, 60 steps
    python benchmarks/local_sgd.py --workers 4 --periods 1,4,16,64 --seeds 0,1,2 --out runs/bench_lsgd

Resumable: a finished run's folder is skipped when the script is run again.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from weightzoo.data.raw import RawDataset
from weightzoo.data.slices import Preprocessing, SliceSet, load_slices
from weightzoo.data.synth import make_phantom_dataset
from weightzoo.evaluate.summary import evaluate_slices
from weightzoo.segmenter import load_model

TASKS = ["cord", "gm"]


def configs(
    periods: list[int], slowmo: float, avg_opt: list[int] | None = None
) -> list[tuple[str, list[str]]]:
    """(name, flags) of every run per seed and mode; `avg_opt` periods also get both with
    --average-optimizer (Adam's moments averaged at each average, as SlowMo's paper allows)."""
    rows: list[tuple[str, list[str]]] = [("sync", ["--ddp"])]
    for h in periods:
        rows.append((f"H={h}", ["--local-sgd", str(h)]))
        if h > 1:
            rows.append((f"H={h}+SlowMo", ["--local-sgd", str(h), "--slowmo", str(slowmo)]))
    for h in avg_opt or []:
        rows.append((f"H={h}+avg-opt", ["--local-sgd", str(h), "--average-optimizer"]))
        rows.append(
            (f"H={h}+SlowMo+avg-opt", ["--local-sgd", str(h), "--slowmo", str(slowmo), "--average-optimizer"])
        )
    return rows


def run_one(
    ds: RawDataset, out: Path, workers: int, steps: int, seed: int, flags: list[str], split: str
) -> float:
    """Train one run with torchrun (skipped when finished); returns the launcher's wall seconds."""
    if (out / "model.json").exists():
        return float(json.loads((out / "model.json").read_text())["info"].get("bench_wall", math.nan))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={workers}"]
    cmd += ["-m", "weightzoo", "train", "-d", str(ds.root), "-t", ",".join(TASKS), "--preset", "tiny"]
    cmd += ["--optimizer", "adam", "--lr", "1e-2", "--steps", str(steps), "--batch-size", "16"]
    cmd += [
        "--seed",
        str(seed),
        "--device",
        "cpu",
        "--no-progress",
        "--split",
        split,
        "--out",
        str(out),
        *flags,
    ]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if res.returncode:
        raise SystemExit(f"run failed: {' '.join(cmd)}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    meta = json.loads((out / "model.json").read_text())
    meta["info"]["bench_wall"] = wall
    (out / "model.json").write_text(json.dumps(meta, indent=1))
    return wall


def test_dice(folder: Path, test: SliceSet) -> dict[str, float]:
    summ = evaluate_slices(load_model(folder, "cpu"), test, tasks=TASKS)
    return {t: float(summ["mean"][t]["Dice"]) for t in TASKS}


def ms(values: list[float]) -> str:
    v = np.array([x for x in values if not math.isnan(x)])
    if not len(v):
        return "n/a"
    return f"{100 * v.mean():.1f} ± {100 * v.std(ddof=1):.1f}" if len(v) > 1 else f"{100 * v.mean():.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--periods", default="1,4,16,64")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--slowmo", type=float, default=0.5)
    ap.add_argument("--modes", default="iid,site")
    ap.add_argument(
        "--avg-opt", default="", help="periods that also run with --average-optimizer, e.g. 16,64"
    )
    ap.add_argument("--subjects", type=int, default=15, help="phantom subjects per site (20 %% are test)")
    ap.add_argument("--out", type=Path, default=Path("runs/bench_lsgd"))
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    if a.quick:
        a.workers, a.periods, a.seeds, a.steps, a.subjects = 2, "1,4", "0", 60, 6
    periods = [int(p) for p in a.periods.split(",")]
    avg_opt = [int(p) for p in a.avg_opt.split(",") if p]
    seeds = [int(s) for s in a.seeds.split(",")]
    a.out.mkdir(parents=True, exist_ok=True)
    data_dir = a.out / "data"
    found = sorted(data_dir.glob("Dataset*")) if data_dir.exists() else []
    ds = (
        RawDataset.open(found[0])
        if found
        else make_phantom_dataset(
            data_dir, sites=a.workers, subjects_per_site=a.subjects, size=64, n_slices=6
        )
    )
    prep = Preprocessing("zscore", (64, 64), 2, ds.n_channels)
    test = load_slices(ds, TASKS, prep=prep, cases=ds.cases_in("test"))
    n_test = len({ds.subject(c) for c in ds.cases_in("test")})
    results: list[dict[str, Any]] = []
    for mode in a.modes.split(","):
        split = "batch" if mode == "iid" else "site"
        for seed in seeds:
            for name, flags in configs(periods, a.slowmo, avg_opt):
                out = a.out / f"{mode}_{name.replace('+', '_')}_s{seed}"
                wall = run_one(ds, out, a.workers, a.steps, seed, flags, split)
                info = json.loads((out / "model.json").read_text())["info"]
                dice = test_dice(out, test)
                comm = info["distributed"]["communication"]
                results.append(
                    {
                        "mode": mode,
                        "config": name,
                        "seed": seed,
                        "dice": dice,
                        "train_seconds": info.get("final", {}).get("seconds"),
                        "wall": wall,
                        "comm": comm,
                    }
                )
                print(
                    f"{mode:5s} {name:14s} seed {seed}: Dice {dice} · {comm['total_bytes'] / 1e6:.2f} MB",
                    flush=True,
                )
    meta = {
        "date": datetime.date.today().isoformat(),
        "device": f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores), gloo",
        "workers": a.workers,
        "steps": a.steps,
        "seeds": seeds,
        "test_subjects": n_test,
        "slowmo": a.slowmo,
        "avg_opt": avg_opt,
    }
    (a.out / "results.json").write_text(json.dumps({"meta": meta, "runs": results}, indent=1))
    md = markdown(results, meta, periods)
    (a.out / "results.md").write_text(md)
    print(md)
    figure(results, periods, a.out, meta)


def _mean_dice(r: dict[str, Any]) -> float:
    return float(np.nanmean([r["dice"][t] for t in TASKS]))


def _by(results: list[dict[str, Any]], mode: str, config: str) -> list[dict[str, Any]]:
    return [r for r in results if r["mode"] == mode and r["config"] == config]


def markdown(results: list[dict[str, Any]], meta: dict[str, Any], periods: list[int]) -> str:
    modes = sorted({r["mode"] for r in results}, key=["iid", "site"].index)
    names = [n for n, _ in configs(periods, meta["slowmo"], meta.get("avg_opt"))]
    lines = [
        f"{meta['workers']} gloo workers, {meta['steps']} steps, seeds {meta['seeds']}, "
        f"{meta['test_subjects']} test subjects; {meta['device']}; {meta['date']}.",
        "",
        "| config | "
        + " | ".join(f"{m}: cord | {m}: gm | {m}: mean" for m in modes)
        + " | all-reduces | MB sent | modelled s @1 Gbit | @10 Gbit | measured wall s |",
        "|---" * (1 + 3 * len(modes) + 5) + "|",
    ]
    for name in names:
        cells = []
        for m in modes:
            rs = _by(results, m, name)
            cells += [ms([r["dice"][t] for r in rs]) for t in TASKS] + [ms([_mean_dice(r) for r in rs])]
        ref = _by(results, modes[0], name)
        comm = ref[0]["comm"]
        calls = sum(v for k, v in comm["calls"].items() if k != "broadcast")
        wall = np.mean([r["wall"] for r in ref])
        lines.append(
            f"| {name} | " + " | ".join(cells) + f" | {calls} | {comm['total_bytes'] / 1e6:.2f} | "
            f"{comm['modelled_seconds_1gbit']:.3f} | {comm['modelled_seconds_10gbit']:.3f} | {wall:.0f} |"
        )
    lines += [
        "",
        "SlowMo gap recovery, (SlowMo − local) / (sync − local), mean Dice over tasks and seeds:",
        "",
    ]
    lines += ["| H | " + " | ".join(modes) + " |", "|---" * (1 + len(modes)) + "|"]
    pairs = [(f"{h}", f"H={h}", f"H={h}+SlowMo") for h in periods if h > 1]
    pairs += [
        (f"{h}, both with avg-opt", f"H={h}+avg-opt", f"H={h}+SlowMo+avg-opt")
        for h in meta.get("avg_opt") or []
    ]
    for label, local_name, slow_name in pairs:
        cells = []
        for m in modes:
            sync = np.mean([_mean_dice(r) for r in _by(results, m, "sync")])
            loc = np.mean([_mean_dice(r) for r in _by(results, m, local_name)])
            slow = np.mean([_mean_dice(r) for r in _by(results, m, slow_name)])
            gap = sync - loc
            cells.append(
                f"{100 * (slow - loc) / gap:.0f} % (gap {100 * gap:.1f} pt)"
                if gap > 0
                else f"no gap ({100 * gap:.1f} pt)"
            )
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def figure(results: list[dict[str, Any]], periods: list[int], out: Path, meta: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from weightzoo.evaluate.report import Report

    modes = sorted({r["mode"] for r in results}, key=["iid", "site"].index)
    fig, axes = plt.subplots(1, len(modes), figsize=(5 * len(modes), 3.6), squeeze=False, sharey=True)
    for ax, m in zip(axes[0], modes, strict=True):
        avg = meta.get("avg_opt") or []
        for label, fmt, names in (
            ("local SGD", "o-", [f"H={h}" for h in periods]),
            ("SlowMo β=0.5", "s-", [f"H={h}+SlowMo" for h in periods if h > 1]),
            ("local SGD + avg-opt", "^--", [f"H={h}+avg-opt" for h in avg]),
            ("SlowMo + avg-opt", "v--", [f"H={h}+SlowMo+avg-opt" for h in avg]),
        ):
            if not names:
                continue
            hs = [int(n.split("=")[1].split("+")[0]) for n in names]
            if not all(_by(results, m, n) for n in names):
                continue
            vals = [[_mean_dice(r) for r in _by(results, m, n)] for n in names]
            ax.errorbar(
                hs, [np.mean(v) for v in vals], [np.std(v) for v in vals], fmt=fmt, capsize=3, label=label
            )
        sync = [_mean_dice(r) for r in _by(results, m, "sync")]
        ax.axhline(np.mean(sync), color="k", ls="--", label="synchronous DDP")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sync period H (steps between averages)")
        ax.set_title({"iid": "IID: rows of one global batch", "site": "non-IID: one site per worker"}[m])
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test Dice (mean of cord, gm)")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    rep = Report(out, "Post-local SGD and SlowMo vs synchronous DDP")
    rep.section(
        "Test Dice vs sync period", f"{meta['workers']} gloo workers on {meta['device']}, {meta['date']}."
    )
    rep.figure(fig, "local_sgd", caption="mean ± sd over seeds; dashed: synchronous DDP")
    rep.text((out / "results.md").read_text())
    rep.write()
    fig.savefig(out / "local_sgd.png", dpi=120)


if __name__ == "__main__":
    main()
