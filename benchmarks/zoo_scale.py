"""Zoo store at scale: 10,000 checkpoints of the `small` preset (483 k parameters), synthetic weights.

Measures (all in one run, so ratios compare like with like on a shared machine):
  1. store layouts on --compare checkpoints: sharded (one file per run) vs one file per checkpoint vs
     sharded float16 — checkpoints/s written (atomic: temp + fsync + rename, then the transaction),
     random-load latency, verify time, bytes on disk vs raw float32;
  2. --n checkpoints (default 10,000 = 500 runs x 20) in the default layout: write rate, disk vs raw
     float32, manifest size, and the time of `ls` and filtered queries (task, site, split, metric range,
     best-k), in-process (a CLI call adds Python + torch start-up on top).
The weights are random perturbations of one initialisation: the store's cost does not depend on values.

    python benchmarks/zoo_scale.py                      # 10,000 checkpoints (~19 GB written, then deleted)
    python benchmarks/zoo_scale.py --n 2000 --compare 200
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import random
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from weightzoo.nets.unet import ArchSpec, build_network, real_state_dict
from weightzoo.zoo.store import PendingCheckpoint, Zoo

TASKS = [["cord"], ["gm"], ["canal"], ["cord", "gm"]]
SITES = ["A", "B", "C", "D"]


def fill(path: Path, n: int, per_run: int, spec: ArchSpec, base: dict, dtype: str, shard: bool) -> float:
    """Write n checkpoints (n / per_run runs); returns seconds spent in Zoo.commit (excludes making weights)."""
    rng = np.random.default_rng(0)  # numpy: torch's RNG spins threads on a busy CPU
    rnd = random.Random(0)
    spent = 0.0
    with Zoo(path, create=True, writable=True, dtype=dtype, shard=shard) as z:
        for r in range(n // per_run):
            tasks = TASKS[r % len(TASKS)]
            run_spec = spec.with_classes(len(tasks))
            rid = f"run{r:05d}"
            split = "test" if r % 10 == 0 else "val" if r % 10 == 1 else "train"
            z.add_run(
                rid, run_spec, tasks, [SITES[r % 4]], split, per_run, {"lr": 0.01}, seed=r, dataset="bench"
            )
            items = []
            for k in range(per_run):
                st = {
                    name: torch.from_numpy(
                        v + np.float32(0.01) * rng.standard_normal(v.shape, dtype=np.float32)
                    )
                    for name, v in base[len(tasks)].items()
                }
                metrics = {t: {"val_dice": rnd.random(), "val_loss": rnd.random()} for t in tasks}
                kind = "init" if k == 0 else "final" if k == per_run - 1 else "random"
                items.append(
                    PendingCheckpoint(rid, k * 10, kind, st, rnd.random(), rnd.random(), 0.01, metrics)
                )
            t = time.perf_counter()
            if shard:  # a run's checkpoints in one shard and one transaction, as a build commits them
                z.commit(items, done_runs=[rid])
            else:  # one file and one transaction per checkpoint
                for i, it in enumerate(items):
                    z.commit([it], done_runs=[rid] if i == len(items) - 1 else [])
            spent += time.perf_counter() - t
    return spent


def timed(fn, repeats: int = 5) -> float:
    fn()
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10_000, help="checkpoints in the big zoo")
    ap.add_argument("--per-run", type=int, default=20, help="checkpoints per run")
    ap.add_argument("--compare", type=int, default=1_000, help="checkpoints per layout in the comparison")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--dir", default=None, help="where to write (default: a temp folder, deleted after)")
    args = ap.parse_args()
    spec = ArchSpec.preset(args.preset)
    base = {
        k: {
            n: v.detach().numpy().copy()
            for n, v in real_state_dict(build_network(spec.with_classes(k), seed=0)).items()
        }
        for k in (1, 2)
    }
    numel = sum(v.size for v in base[1].values())
    print(
        f"date: {datetime.date.today().isoformat()} · torch {torch.__version__} · preset {args.preset}: {numel:,} parameters ({numel * 4 / 2**20:.2f} MB float32)"
    )
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root = Path(tmp)
        print(
            "\n| layout | checkpoints | write ckpt/s | write MB/s | load ms (median of 50) | verify s | disk / raw float32 |"
        )
        print("|---|---|---|---|---|---|---|")
        for name, dtype, shard in (
            ("sharded float32", "float32", True),
            ("one file per checkpoint", "float32", False),
            ("sharded float16", "float16", True),
        ):
            path = root / name.replace(" ", "_")
            secs = fill(path, args.compare, args.per_run, spec, base, dtype, shard)
            with Zoo(path) as z:
                ids = [c.ckpt_id for c in z.checkpoints()]
                recs = {c.ckpt_id: c for c in z.checkpoints()}
                picks = random.Random(1).sample(ids, min(50, len(ids)))
                loads = []
                for cid in picks:
                    t = time.perf_counter()
                    z.load(recs[cid])
                    loads.append(time.perf_counter() - t)
                t = time.perf_counter()
                rep = z.verify()
                t_verify = time.perf_counter() - t
                assert rep.ok, rep.problems[:3]
                disk = sum(p.stat().st_size for p in (path / "data").rglob("*") if p.is_file())
            raw = len(ids) * numel * 4
            print(
                f"| {name} | {len(ids)} | {len(ids) / secs:.0f} | {disk / 2**20 / secs:.0f} | {1e3 * statistics.median(loads):.1f} | {t_verify:.1f} | {disk / raw:.3f} |",
                flush=True,
            )

        big = root / "big"
        t0 = time.perf_counter()
        secs = fill(big, args.n, args.per_run, spec, base, "float32", True)
        wall = time.perf_counter() - t0
        disk = sum(p.stat().st_size for p in (big / "data").rglob("*") if p.is_file())
        manifest = sum(p.stat().st_size for p in big.glob("manifest.sqlite*"))
        raw = args.n * numel * 4
        print(
            f"\n{args.n} checkpoints ({args.n // args.per_run} runs) written in {wall:.0f} s ({secs:.0f} s in commits, {args.n / secs:.0f} ckpt/s); "
            f"data {disk / 2**30:.2f} GiB = {disk / raw:.4f} x raw float32 ({raw / 2**30:.2f} GiB); manifest {manifest / 2**20:.1f} MiB"
        )
        from weightzoo.cli import main as cli

        with Zoo(big) as z:
            queries = {
                "open the zoo": lambda: Zoo(big).close(),
                "summary (counts, Dice ranges, disk)": lambda: z.summary(),
                "runs(task='cord', site='A')": lambda: z.runs(task="cord", site="A"),
                "checkpoints() — all": lambda: z.checkpoints(),
                "checkpoints(task='gm', site='B', split='train')": lambda: z.checkpoints(
                    task="gm", site="B", split="train"
                ),
                "checkpoints(task='cord', metric='val_dice', 0.8..0.9)": lambda: z.checkpoints(
                    task="cord", metric="val_dice", min_value=0.8, max_value=0.9
                ),
                "checkpoints(task='cord', order_by='-val_dice', limit=10)": lambda: z.checkpoints(
                    task="cord", order_by="-val_dice", limit=10
                ),
                "norm_stats() of the train split": lambda: z.norm_stats(spec.hash()),
                "`weightzoo zoo ls` (in-process, table rendered)": lambda: _quiet(
                    cli, ["zoo", "ls", str(big)]
                ),
                "`weightzoo zoo ls --task cord --site A`": lambda: _quiet(
                    cli, ["zoo", "ls", str(big), "--task", "cord", "--site", "A"]
                ),
            }
            print("\n| query on the big zoo | rows | median s |")
            print("|---|---|---|")
            for name, fn in queries.items():
                res = fn()
                rows = len(res) if isinstance(res, list) else "—"
                print(f"| {name} | {rows} | {timed(fn):.3f} |", flush=True)


def _quiet(fn, argv: list[str]) -> int:
    with contextlib.redirect_stdout(io.StringIO()):
        from rich.console import Console

        import weightzoo.cli.zoo as cz

        old = cz.console
        cz.console = Console(file=io.StringIO(), width=160)
        try:
            return fn(argv)
        finally:
            cz.console = old


if __name__ == "__main__":
    main()
