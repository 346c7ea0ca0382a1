"""Benchmark of weight generation on the phantom zoo: build (or reuse) a small zoo, train generators
with several seeds, and run `generate eval` (weightzoo.generate.evaluate) on them; plus an ablation of
the generator's design (token encoder, permutation augmentation, fresh-init augmentation).

    python benchmarks/generate_eval.py --work /tmp/wz_gen_bench --threads 1  # CPU: ~30 min + the zoo
    python benchmarks/generate_eval.py --work W --zoo-preset small --zoo-seeds 10 --preset small \
        --device cuda --jobs 3 --gen-budget-s 600 --no-ablation                               # a GPU

--jobs N trains N generators at once (separate processes; on a GPU they share it). --gen-budget-s B
chooses the generator's steps so that training takes about B seconds: a probe trains the N
generators together for a few steps, and steps = B / (seconds per step), clamped to [500, the preset's].
The steps used and the probe's timing are written to results.json and the tables.

Prints markdown tables (also written to WORK/tables.md, with WORK/results.json and the HTML report in
WORK/eval/). Everything is resumable: the zoo build, each generator and the evaluation's inputs are
reused when the script is run again with the same options. Timings on a shared machine are noisy;
the time-to-a-model number is a ratio of two timings taken in the same process.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import platform
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch

from weightzoo.data.raw import RawDataset
from weightzoo.data.synth import make_phantom_dataset
from weightzoo.generate.evaluate import evaluate_generators, fmt, mean_sd
from weightzoo.generate.train import GenTrainConfig, train_generator
from weightzoo.zoo.build import build_zoo

# 4 task entries (3 single tasks + one 3-task run) x 2 sites x 5 seeds = 40 runs x 12 checkpoints.
# Site C stays out of the zoo: the "site not in the zoo" test.
GRID: dict[str, Any] = {
    "tasks": ["cord", "gm", "canal", ["cord", "gm", "canal"]],
    "sites": ["A", "B"],
    "seeds": 5,
    "preset": "tiny",
    "optimizer": "adam",
    "lr": 3e-3,
    "steps": 300,
    "batch_size": 8,
    "size": 32,
    "augment": 0.5,
    "checkpoints": 10,
    "run_split": {"train": 0.7, "val": 0.15, "test": 0.15},
    "split_seed": 0,
}


def dataset(work: Path) -> RawDataset:
    parent = work / "data"
    found = sorted(parent.glob("Dataset*_Phantom")) if parent.exists() else []
    if found:
        return RawDataset.open(found[0])
    return make_phantom_dataset(parent, sites=3, subjects_per_site=8, size=32, n_slices=8, seed=0)


def _train(work: Path, name: str, cfg: dict[str, Any], stop_after: int | None = None) -> dict[str, Any]:
    """Train one generator (in a worker process when --jobs > 1); a summary of it."""
    r = train_generator(work / "zoo", work / name, GenTrainConfig(**cfg), log=print, stop_after=stop_after)
    return {
        "seconds": round(r.seconds, 1),
        "steps": r.steps,
        "final_loss": r.history[-1]["loss"] if r.history else None,
        "final_val_run_loss": r.history[-1]["val_loss"] if r.history else None,
        "n_params": r.meta.get("n_params"),
        "precision": r.meta.get("precision"),
        "history": r.history,
    }


def train_all(
    work: Path, jobs: list[tuple[str, dict[str, Any]]], n_jobs: int, stop_after: int | None = None
) -> list[dict[str, Any]]:
    if n_jobs <= 1:
        return [_train(work, name, cfg, stop_after) for name, cfg in jobs]
    ctx = multiprocessing.get_context("spawn")  # CUDA in workers needs spawn
    with ProcessPoolExecutor(n_jobs, mp_context=ctx) as ex:
        futures = [ex.submit(_train, work, name, cfg, stop_after) for name, cfg in jobs]
        return [f.result() for f in futures]


def machine(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (torch {torch.__version__}, CUDA {torch.version.cuda})"
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads"


def markdown(rows: list[dict[str, Any]]) -> str:
    """Rows (lists of per-generator values as mean ± sd) as a markdown table."""
    if not rows:
        return "(no rows)\n"
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols and k != "note"]

    def cell(v: Any) -> str:
        if isinstance(v, list):
            return fmt(v)
        if isinstance(v, float):
            return "–" if math.isnan(v) else f"{v:.3f}"
        return str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True, help="Folder for data, zoo, generators, results.")
    ap.add_argument("--preset", default="tiny", help="Generator preset: tiny | small | default.")
    ap.add_argument("--zoo-preset", default="tiny", help="U-Net preset of the zoo's runs.")
    ap.add_argument("--zoo-seeds", type=int, default=5, help="Seeds per task/site of the zoo grid.")
    ap.add_argument("--jobs", type=int, default=1, help="Generators trained at once (processes).")
    ap.add_argument(
        "--gen-budget-s", type=float, default=0, help="Choose generator steps for ~this many seconds."
    )
    ap.add_argument("--steps", type=int, default=800, help="Generator training steps.")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seeds", default="0,1,2", help="Generator seeds (>= 3 for a spread).")
    ap.add_argument("--fresh-init", type=float, default=0.0, help="Fresh-init augmentation probability.")
    ap.add_argument("--candidates", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default).")
    ap.add_argument("--no-ablation", action="store_true", help="Skip the design ablation.")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    results: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(args.device),
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    grid = {**GRID, "preset": args.zoo_preset, "seeds": args.zoo_seeds}
    results["grid"] = grid

    ds = dataset(work)
    t0 = time.perf_counter()
    b = build_zoo(ds, grid, work / "zoo", device=args.device, progress=False)
    results["zoo"] = {
        "runs": b.runs_planned,
        "checkpoints": b.checkpoints_planned,
        "seconds_this_call": round(time.perf_counter() - t0, 1),
        "runs_trained_this_call": b.runs_trained,
    }

    def cfg_of(seed: int, **kw: Any) -> dict[str, Any]:
        return {
            "preset": args.preset,
            "steps": args.steps,
            "batch_size": args.batch_size,
            "seed": seed,
            "device": args.device,
            "fresh_init": kw.pop("fresh_init", args.fresh_init),
            **kw,
        }

    seeds = [int(s) for s in args.seeds.split(",")]
    if args.gen_budget_s > 0:  # probe: the generators together for PROBE steps, timed from step 10
        probe, every = 40, 10
        jobs = [(f"_probe_s{s}", {**cfg_of(s), "steps": 10**6, "log_every": every}) for s in seeds]
        for name, _ in jobs:
            shutil.rmtree(work / name, ignore_errors=True)
        hist = [r["history"] for r in train_all(work, jobs, args.jobs, stop_after=probe)]
        per_step = max((h[-1]["seconds"] - h[0]["seconds"]) / (probe - every) for h in hist)
        for name, _ in jobs:
            shutil.rmtree(work / name, ignore_errors=True)
        default = GenTrainConfig(preset=args.preset).steps
        args.steps = int(min(default, max(500, args.gen_budget_s / per_step)))  # type: ignore[arg-type]
        results["generator_steps_from_budget"] = {
            "budget_s": args.gen_budget_s,
            "probe_seconds_per_step": round(per_step, 4),
            "generators_at_once": min(args.jobs, len(seeds)),
            "steps": args.steps,
        }
        print(f"probe: {per_step:.3f} s/step with {len(seeds)} generator(s) at once -> {args.steps} steps")

    def gens_of(jobs: list[tuple[str, dict[str, Any]]]) -> list[Path]:
        for (name, _), info in zip(jobs, train_all(work, jobs, args.jobs), strict=True):
            info.pop("history")
            results.setdefault("generators", {})[name] = info
        return [work / name for name, _ in jobs]

    gens = gens_of([(f"gen_s{s}", cfg_of(s)) for s in seeds])
    res = evaluate_generators(
        gens, work / "zoo", ds, work / "eval", candidates=args.candidates, log=print, device=args.device
    )
    results["eval"] = res

    if not args.no_ablation:  # one generator seed per variant; the parts that need no training run
        extra = gens_of(
            [
                ("gen_per_layer", cfg_of(seeds[0], encoder="per_layer")),
                ("gen_no_perm", cfg_of(seeds[0], permute=0.0)),
                ("gen_fresh", cfg_of(seeds[0], fresh_init=0.3)),
            ]
        )
        variants = {
            "shared encoder (default)": gens[0],
            "per-layer encoder": extra[0],
            "no permutation augmentation": extra[1],
            "fresh-init augmentation 0.3": extra[2],
        }
        abl = []
        for name, g in variants.items():
            r = evaluate_generators(
                [g],
                work / "zoo",
                ds,
                work / f"eval_{g.name}",
                candidates=1,
                parts=("general",),
                log=print,
                device=args.device,
            )

            def pooled(kind: str, rows: list[dict[str, Any]] = r["general"]) -> float:
                return mean_sd(
                    [v for row in rows if row["start"].startswith(kind) for v in row["generated test"]]
                )[0]

            info = results["generators"][g.name]
            abl.append(
                {
                    "generator": name,
                    "parameters": info["n_params"],
                    "final val-run loss": info["final_val_run_loss"],
                    "from fresh inits": pooled("fresh init"),
                    "from held-out mid-training checkpoints": pooled("held-out run, mid"),
                    "site not in the zoo": pooled("site not in the zoo"),
                }
            )
        results["ablation"] = abl

    results["seconds_total"] = round(time.perf_counter() - t_all, 1)
    (work / "results.json").write_text(json.dumps(results, indent=1, default=str))
    tables = [f"Machine: {results['machine']}; total {results['seconds_total']} s\n"]
    if "generator_steps_from_budget" in results:
        tables.append(f"Generator steps from the time budget: {results['generator_steps_from_budget']}\n")
    gi = results.get("generators", {})
    tables.append(
        "Generators: "
        + "; ".join(
            f"{k}: {v['steps']} steps, {v['seconds']} s, val-run loss {v['final_val_run_loss']}"
            for k, v in gi.items()
        )
        + "\n"
    )
    tables += ["### Generated vs the zoo's best checkpoint (test Dice)\n", markdown(res["best"])]
    al = res["alignment"]
    for name in ("fresh init", "held-out checkpoint"):
        if name in al:
            r2 = ", ".join(f"{v:.2f}" for v in al[name]["r2_per_generator"])
            tables.append(
                f"Prompt alignment from {name}: R² per generator {r2}; Pearson r {al[name]['pearson_r']:.2f}\n"
            )
    tables += ["### Generalisation (test Dice)\n", markdown(res["general"])]
    if res.get("multitask"):
        tables += ["### One network for three tasks (test Dice per task)\n", markdown(res["multitask"])]
    if res.get("time"):
        tables += ["### Time to a model\n", markdown([res["time"]])]
    if results.get("ablation"):
        tables += ["### Design ablation (generator seed 0)\n", markdown(results["ablation"])]
    text = "\n".join(tables)
    (work / "tables.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
