"""In-context segmentation on held-out REAL tasks: Dice vs support size S for one or more models.

Runs `weightzoo.incontext.evaluate.run_evaluation` (the code behind `weightzoo incontext eval`) for each
model on the same tasks, splits and support draws, prints each model's tables (per task, the mean over
the real held-out tasks beside UniverSeg's published curve, the goal checks), then one table comparing
the models. Tasks and methods: see weightzoo/incontext/evaluate.py and heldout.py.

    python benchmarks/incontext_heldout.py                          # the shipped model, full settings
    python benchmarks/incontext_heldout.py --model m05/ --model m1/ --model m2/   # compare models
    python benchmarks/incontext_heldout.py --quick                  # smoke run: 3 tasks, S = 1, 4, 16

Full settings: the 9 real held-out tasks, S = 1..64, 2 draws per S, 8 queries per task (whole
subjects: CHASE's 8 crops are one child's two eyes), the ensemble of the 2 draws, 5 candidates at S = 4 and 16
(first draw); `--nnunet` adds the small nnU-Net at S = 4 and 16. The cost is linear in queries x draws
x S (about 14 k query-support passes): before running, one query at S = 16 is timed and the run's
time estimated. `--queries 16 --repeats 3` (the CLI's defaults) gives tighter means in 3x the time.
Data: ../shared/data (or --data / $WEIGHTZOO_DATA; datasets' licences and citations are
in their folders). Outputs: OUT/<model>/results.{json,md}, report.html, OUT/comparison.{md,json}.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

from weightzoo.fileio import atomic_write_bytes, atomic_write_json
from weightzoo.incontext.evalreport import (
    UNIVERSEG_CITATION,
    UNIVERSEG_ENSEMBLE,
    UNIVERSEG_SINGLE,
    checks_markdown,
    jsonable,
    markdown_table,
    results_markdown,
)
from weightzoo.incontext.evaluate import (
    DEFAULT_TASKS,
    EvalSettings,
    EvalTask,
    device_line,
    load_tasks,
    query_batch,
    run_evaluation,
    split_queries,
)
from weightzoo.incontext.model import count_parameters
from weightzoo.incontext.train import load_incontext_model

QUICK_TASKS = ("wbc-cell", "chase-vessels", "hc18-head")
QUICK = EvalSettings(support_sizes=(1, 4, 16), repeats=2, n_queries=8, ensemble=2, candidate_sizes=(4,))
# Sized for <= ~15 min for a ~1 M-parameter 128 px model on one core: the cost is linear in
# queries x draws x S (one 128 px query at S = 16 took 0.8-1.2 s on the shared EPYC core).
FULL = EvalSettings(repeats=2, n_queries=8, ensemble=2)
CANDIDATE_COST = 2.2  # K = 5 candidates vs one prediction, measured at S = 4..16


def estimate_seconds(net: Any, tasks: list[EvalTask], st: EvalSettings, device: str) -> tuple[float, float]:
    """Time one query at S = 16 on random inputs and extrapolate (linear in S) to the whole run:
    -> (seconds per query at S = 16, estimated seconds without the nnU-Net)."""
    import warnings

    import numpy as np

    from weightzoo.incontext import segment_batch

    size = net.spec.size
    rng = np.random.default_rng(0)
    queries = list(rng.random((2, size, size), dtype=np.float32))

    def timed(s: int) -> float:
        sx = list(rng.random((s, size, size), dtype=np.float32))
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            segment_batch(
                queries, sx, [x > 0.5 for x in sx], model=net, device=device, batch_size=query_batch(s, size)
            )
        return (time.perf_counter() - t0) / len(queries)

    timed(2)  # warm-up
    per16 = timed(16)
    total = 0.0
    for task in tasks:
        q_idx, pool = split_queries(task, st.n_queries, st.seed)
        for s in st.support_sizes:
            if s <= len(pool):
                one = len(q_idx) * s * per16 / 16  # every query, one draw
                total += one * max(st.repeats, st.ensemble)
                total += one * st.repeats * st.subsets * 0.75 if st.subsets > 1 and s > 1 else 0.0
                if st.candidates > 1 and (st.candidate_sizes is None or s in st.candidate_sizes):
                    total += one * CANDIDATE_COST
    return per16, total


def _labels(models: list[str | None]) -> list[str]:
    """Short unique names: the folder's name, 'shipped' for the shipped weights."""
    out: list[str] = []
    for m in models:
        base = "shipped" if m is None else Path(m).resolve().name
        name, i = base, 2
        while name in out:
            name, i = f"{base}-{i}", i + 1
        out.append(name)
    return out


def comparison_table(labels: list[str], results: list[dict[str, Any]]) -> str:
    """Mean over real held-out tasks per S: each model's single and ensemble Dice side by side, the
    mean-of-support baseline (first model's grid) and UniverSeg."""
    sizes = sorted({m["S"] for r in results for m in r["mean_rows"]})
    rows = []
    for s in sizes:
        row: dict[str, Any] = {"S": s}
        for label, res in zip(labels, results, strict=True):
            m = next((x for x in res["mean_rows"] if x["S"] == s), {})
            row[f"{label} single"] = m.get("single")
            row[f"{label} ens"] = m.get("ensemble")
            row.setdefault("tasks", m.get("tasks"))
        first = next((x for x in results[0]["mean_rows"] if x["S"] == s), {})
        row["mean-of-support"] = first.get("mean-of-support")
        row["UniverSeg"] = UNIVERSEG_SINGLE.get(s)
        row["UniverSeg ens"] = UNIVERSEG_ENSEMBLE.get(s)
        rows.append(row)
    cols = ["S", "tasks"] + [f"{lab} {k}" for lab in labels for k in ("single", "ens")]
    return markdown_table(rows, [*cols, "mean-of-support", "UniverSeg", "UniverSeg ens"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--model", action="append", default=None, help="model folder (repeatable; default: shipped)"
    )
    ap.add_argument(
        "--quick", action="store_true", help="smoke run: 3 tasks, S = 1, 4, 16, 2 draws, 8 queries"
    )
    ap.add_argument("--estimate", action="store_true", help="only load, time one query and estimate the run")
    ap.add_argument("--tasks", default=None, help="comma-separated held-out tasks (default: all real ones)")
    ap.add_argument("--support-sizes", default=None, help="e.g. 1,2,4,8,16,32,64")
    ap.add_argument("--repeats", type=int, default=None, help="support draws per S")
    ap.add_argument("--queries", type=int, default=None, help="queries per task")
    ap.add_argument("--nnunet", action="store_true", help="also a small nnU-Net at S = 4, 16 (slow on a CPU)")
    ap.add_argument(
        "--data", default=None, help="real-data folder (default: $WEIGHTZOO_DATA or ../shared/data)"
    )
    ap.add_argument("--out", default="/tmp/incontext_heldout", help="output folder")
    ap.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (the budget is one core)")
    args = ap.parse_args(argv)
    args.data = args.data or os.environ.get("WEIGHTZOO_DATA") or "../shared/data"  # the developers' layout

    torch.set_num_threads(args.threads)
    st = QUICK if args.quick else FULL
    over: dict[str, Any] = {}
    if args.support_sizes:
        over["support_sizes"] = tuple(int(v) for v in args.support_sizes.split(","))
    if args.repeats:
        over["repeats"] = over["ensemble"] = args.repeats  # the ensemble averages the draws: free
    if args.queries:
        over["n_queries"] = args.queries
    if args.nnunet:
        over["nnunet_steps"] = 150
    st = dataclasses.replace(st, **over)
    tasks = args.tasks.split(",") if args.tasks else list(QUICK_TASKS if args.quick else DEFAULT_TASKS)
    models: list[str | None] = args.model or [None]
    labels = _labels(models)
    out = Path(args.out)

    nets = [load_incontext_model(m, args.device) for m in models]
    print("# In-context segmentation on held-out real tasks")
    print(f"date {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}")
    print(f"device {device_line(nets[0])}; torch {torch.__version__}; python {platform.python_version()}")
    print(f"settings {'quick' if args.quick else 'full'}: {st}")
    print(f"tasks {', '.join(tasks)}")
    for label, m, net in zip(labels, models, nets, strict=True):
        spec = net.spec
        print(
            f"model {label}: {count_parameters(net):,} parameters, features {list(spec.features)}, "
            f"{spec.size} px ({m or 'shipped weights'})"
        )
    print(f"UniverSeg anchor: {UNIVERSEG_CITATION}")

    t0 = time.perf_counter()
    loaded: dict[tuple[str, int], EvalTask] = {}  # tasks by (name, grid size): loaded once per grid
    estimates = []
    for label, net in zip(labels, nets, strict=True):
        size = net.spec.size
        todo = [n for n in tasks if (n, size) not in loaded]
        loaded.update({(t.name, size): t for t in load_tasks(todo, args.data, size, out / "cache", st.limit)})
        per16, est = estimate_seconds(net, [loaded[(n, size)] for n in tasks], st, args.device)
        estimates.append(est)
        print(
            f"model {label}: one query at S = 16 takes {per16:.2f} s here; this run: about {est / 60:.1f} min"
            + (" plus the nnU-Net" if st.nnunet_steps else "")
        )
    print(f"tasks loaded in {time.perf_counter() - t0:.0f} s")
    sys.stdout.flush()
    if args.estimate:
        return 0

    results = []
    for label, m, est in zip(labels, models, estimates, strict=True):
        print(f"\n## {label}")
        res = run_evaluation(m, tasks, out / label, st, args.data, args.device, log=print, loaded=loaded)
        print(f"{label}: evaluation took {res['seconds']:.0f} s (estimated {est:.0f} s)")
        print("\n" + results_markdown(res))
        results.append(res)
    total = time.perf_counter() - t0

    lines = [
        "## Comparison: mean Dice over the real held-out tasks",
        "",
        comparison_table(labels, results),
        "",
        f"UniverSeg: {UNIVERSEG_CITATION}.",
        "",
    ]
    for label, res in zip(labels, results, strict=True):
        lines += [
            f"**{label}** ({res['n_params']:,} parameters, {res['size']} px, {res['seconds']} s):",
            "",
            checks_markdown(res["checks"]),
            "",
        ]
    lines.append(f"Total {total:.0f} s ({total / 60:.1f} min) on {device_line(nets[0])}.")
    text = "\n".join(lines)
    print("\n" + text)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "comparison.md", (text + "\n").encode())
    atomic_write_json(
        out / "comparison.json",
        jsonable(
            {
                "models": [
                    {
                        "label": lab,
                        "folder": m,
                        "n_params": r["n_params"],
                        "size": r["size"],
                        "mean_rows": r["mean_rows"],
                        "checks": r["checks"],
                    }
                    for lab, m, r in zip(labels, models, results, strict=True)
                ],
                "settings": dataclasses.asdict(st),
                "tasks": tasks,
                "seconds": round(total, 1),
            }
        ),
    )
    print(f"wrote {out / 'comparison.md'} and {len(results)} report(s) under {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
