"""Does resolution rescue thin structures? In-context Dice untiled vs tiled at a larger scale.

Each held-out image is put on a `--grid` px grid (default 256, twice the model's 128 px). "untiled":
`segment` resizes it to 128 px and maps the result back, as usual. "tiled": the image is cut into
(grid/128)^2 tiles of 128 px, each support image is cut the same way (S images -> S·tiles support
items), every query tile is segmented from all support tiles, and the tiles are stitched back. Both are
scored on the grid against observer 1, on the same queries and support draws as `incontext eval`
(whole subjects as queries, seeded draws).

    python benchmarks/incontext_tiling.py                     # CHASE vessels, S = 4, 16, 2 draws
    python benchmarks/incontext_tiling.py --task hc18-head --grid 384

Data: ../shared/data (or --data / $WEIGHTZOO_DATA). Prints a table; writes OUT/tiling.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from weightzoo.fileio import atomic_write_bytes, atomic_write_json
from weightzoo.incontext import load_model, segment_batch
from weightzoo.incontext.evaluate import CHUNK, _dices, device_line, nanmean
from weightzoo.incontext.heldout import load_eval_task, split_queries

TILE = 128


def tiles(a: np.ndarray, t: int) -> np.ndarray:
    """[N, t·TILE, t·TILE] -> [N·t·t, TILE, TILE], row-major tiles per image."""
    n = a.shape[0]
    return a.reshape(n, t, TILE, t, TILE).transpose(0, 1, 3, 2, 4).reshape(-1, TILE, TILE)


def untile(a: np.ndarray, t: int) -> np.ndarray:
    """The inverse of `tiles`."""
    n = a.shape[0] // (t * t)
    return a.reshape(n, t, t, TILE, TILE).transpose(0, 1, 3, 2, 4).reshape(n, t * TILE, t * TILE)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="chase-vessels")
    ap.add_argument("--grid", type=int, default=256, help="a multiple of 128")
    ap.add_argument("--sizes", default="4,16", help="support sizes S")
    ap.add_argument("--repeats", type=int, default=2, help="support draws per S")
    ap.add_argument("--queries", type=int, default=8)
    ap.add_argument("--model", default=None, help="model folder (default: the shipped weights)")
    ap.add_argument("--data", default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="runs/bench_incontext_tiling")
    a = ap.parse_args(argv)
    if a.grid % TILE:
        print(f"error: --grid {a.grid} is not a multiple of {TILE}; give e.g. 256 or 384", file=sys.stderr)
        return 2
    warnings.filterwarnings("ignore", "a support of one")
    torch.set_num_threads(a.threads)
    t = a.grid // TILE
    net = load_model(a.model, device="cpu")
    data = a.data or os.environ.get("WEIGHTZOO_DATA") or "../shared/data"  # the developers' layout
    with tempfile.TemporaryDirectory() as cache:
        task = load_eval_task(a.task, data, a.grid, Path(cache))
    q_idx, pool = split_queries(task, a.queries, 0)
    queries, refs = task.images[q_idx].numpy(), task.labels[q_idx].numpy() > 0
    rows = []
    for s in map(int, a.sizes.split(",")):
        got: dict[str, list[float]] = {"untiled": [], "tiled": []}
        for r in range(a.repeats):
            idx = np.random.default_rng([0, s, r]).choice(pool, s, replace=False)
            sx, sy = task.images[idx].numpy(), task.labels[idx].numpy()
            p = np.stack(segment_batch(list(queries), list(sx), list(sy), model=net, seed=r, chunk=CHUNK))
            got["untiled"].append(nanmean(_dices(p[:, 0], refs)))
            pt = segment_batch(
                list(tiles(queries, t)), list(tiles(sx, t)), list(tiles(sy, t)), model=net, seed=r,
                batch_size=4, chunk=CHUNK,
            )  # fmt: skip
            got["tiled"].append(nanmean(_dices(untile(np.stack(pt)[:, 0], t), refs)))
            print(
                f"S={s} draw {r}: untiled {got['untiled'][-1]:.3f}  tiled {got['tiled'][-1]:.3f}", flush=True
            )
        rows.append({"S": s, **{k: float(np.mean(v)) for k, v in got.items()}, "draws": got})
    head = (
        f"{a.task}, {a.grid} px grid, {t}x{t} tiles of {TILE} px; {len(q_idx)} queries, {a.repeats} draws; "
        f"{datetime.date.today()}, {device_line(net)}, torch {torch.__version__}"
    )
    md = [head, "", "| S | untiled | tiled | tiled − untiled |", "|---:|---:|---:|---:|"]
    md += [
        f"| {r['S']} | {r['untiled']:.3f} | {r['tiled']:.3f} | {r['tiled'] - r['untiled']:+.3f} |"
        for r in rows
    ]
    text = "\n".join(md) + "\n"
    print(text)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "tiling.json", {"setup": head, "rows": rows})
    atomic_write_bytes(out / "tiling.md", text.encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
