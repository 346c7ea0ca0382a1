"""Benchmark of weight generation on the phantom zoo: build (or reuse) a small zoo, train generators
with several seeds, and run `generate eval` (weightzoo.generate.evaluate) on them; plus an ablation of
the generator's design (token encoder, permutation augmentation, fresh-init augmentation).

    python benchmarks/generate_eval.py --work /tmp/wz_gen_bench --threads 1  # CPU: ~30 min + the zoo
    python benchmarks/generate_eval.py --work W --preset small --steps 20000 --device cuda   # a GPU

Prints markdown tables (also written to WORK/tables.md, with WORK/results.json and the HTML report in
WORK/eval/). Everything is resumable: the zoo build, each generator and the evaluation's inputs are
reused when the script is run again with the same options. Timings on a shared machine are noisy;
the time-to-a-model number is a ratio of two timings taken in the same process.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
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
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads",
        "args": {k: str(v) for k, v in vars(args).items()},
        "grid": GRID,
    }

    ds = dataset(work)
    t0 = time.perf_counter()
    b = build_zoo(ds, GRID, work / "zoo", device=args.device, progress=False)
    results["zoo"] = {
        "runs": b.runs_planned,
        "checkpoints": b.checkpoints_planned,
        "seconds_this_call": round(time.perf_counter() - t0, 1),
        "runs_trained_this_call": b.runs_trained,
    }

    def gen(name: str, seed: int, **kw: Any) -> Path:
        cfg = GenTrainConfig(
            preset=args.preset,
            steps=args.steps,
            batch_size=args.batch_size,
            seed=seed,
            device=args.device,
            fresh_init=kw.pop("fresh_init", args.fresh_init),
            **kw,
        )
        out = work / name
        r = train_generator(work / "zoo", out, cfg, log=print)
        results.setdefault("generators", {})[name] = {
            "seconds": round(r.seconds, 1),
            "steps": r.steps,
            "final_loss": r.history[-1]["loss"] if r.history else None,
            "final_val_run_loss": r.history[-1]["val_loss"] if r.history else None,
            "n_params": r.meta.get("n_params"),
        }
        return out

    seeds = [int(s) for s in args.seeds.split(",")]
    gens = [gen(f"gen_s{s}", s) for s in seeds]
    res = evaluate_generators(gens, work / "zoo", ds, work / "eval", candidates=args.candidates, log=print)
    results["eval"] = res

    if not args.no_ablation:  # one generator seed per variant; the parts that need no training run
        variants = {
            "shared encoder (default)": gens[0],
            "per-layer encoder": gen("gen_per_layer", seeds[0], encoder="per_layer"),
            "no permutation augmentation": gen("gen_no_perm", seeds[0], permute=0.0),
            "fresh-init augmentation 0.3": gen("gen_fresh", seeds[0], fresh_init=0.3),
        }
        abl = []
        for name, g in variants.items():
            r = evaluate_generators(
                [g], work / "zoo", ds, work / f"eval_{g.name}", candidates=1, parts=("general",), log=print
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
