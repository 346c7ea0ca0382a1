"""Evaluate an in-context model on held-out tasks: Dice vs support size S, baselines, goal checks.

The tasks (REAL_TASKS: WBC, SCT, CHASE vessels, HC18 heads; PHANTOM_TASKS) and their loaders are in
weightzoo.incontext.heldout. Each task is split once (seeded, by subject/group: a group never sits on
both sides) into up to `n_queries` queries and a support pool. Nothing is selected on the queries.
For each support size S (skipped, and reported, when S exceeds the pool) there are `repeats` seeded
draws of S pool examples; the draws depend on (seed, S, draw) only, so every model sees the same ones.
Per draw, the mean query Dice of:
  single            one prediction from the S examples
  mean-of-support   the trivial baseline: the pixelwise mean of the S support masks, thresholded at 0.5
                    (same draws)
  ensemble-subsets  (optional, `subsets=E`) E random subsets of 3/4 of the same S, averaged
and, on the first draw at `candidate_sizes` / `nnunet_sizes` only (they are slow on a CPU):
  best-candidate    best of K candidates per query (an oracle pick, so an upper bound)
  GED               generalised energy distance of the K candidates to the set of references (CHASE:
                    both observers), d = 1 - IoU, lower is better
  nnunet            a 'tiny' nnU-Net trained on the same S examples (`nnunet_steps` steps)
Across draws:
  ensemble          UniverSeg's ensembling: the probabilities of `ensemble` independent draws of size S
                    averaged; the draws are those of `single` (extra ones only if ensemble > repeats),
                    so it costs nothing more; one value per group of `ensemble` draws
Dice is computed on the model grid (padded square) and averaged over queries whose reference or
prediction is non-empty (nnU-Net's rule: both empty = no score). The summary averages each S over the
REAL tasks evaluated at that S (phantoms never enter it) and checks the goals (GOALS).
"""

from __future__ import annotations

import datetime
import math
import platform
import tempfile
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from weightzoo.evaluate.metrics import dice
from weightzoo.fileio import atomic_write_bytes, atomic_write_json
from weightzoo.incontext.evalreport import (
    UNIVERSEG_CITATION,
    UNIVERSEG_ENSEMBLE,
    UNIVERSEG_SINGLE,
    jsonable,
    nanmean,
    report,
    results_markdown,
    summarize,
)
from weightzoo.incontext.heldout import (
    DEFAULT_TASKS,
    EVAL_TASKS,
    PHANTOM_TASKS,
    REAL_TASKS,
    EvalTask,
    load_eval_task,
    load_tasks,
    resolve_data_root,
    split_queries,
)

__all__ = [
    "DEFAULT_TASKS",
    "EVAL_TASKS",
    "PHANTOM_TASKS",
    "REAL_TASKS",
    "EvalSettings",
    "EvalTask",
    "evaluate_task",
    "ged",
    "load_eval_task",
    "load_tasks",
    "mean_of_support",
    "resolve_data_root",
    "run_evaluation",
    "split_queries",
]

SUPPORT_SIZES = (1, 2, 4, 8, 16, 32, 64)
CHUNK, CHUNK_FROM = 16, 32  # walk the support 16 at a time from S = 32 on: bounded memory


@dataclass(frozen=True)
class EvalSettings:
    """What to evaluate (see the module docstring). `*_sizes` None = every S."""

    support_sizes: tuple[int, ...] = SUPPORT_SIZES
    repeats: int = 3
    n_queries: int = 16
    limit: int = 120  # images per task (CHASE: crops)
    ensemble: int = 3  # draws averaged by the UniverSeg ensemble; <= 1: off
    subsets: int = 0  # members of ensemble-subsets; <= 1: off
    candidates: int = 5  # K; <= 1: off
    candidate_sizes: tuple[int, ...] | None = (4, 16)
    nnunet_steps: int = 0  # 0: off
    nnunet_sizes: tuple[int, ...] | None = (4, 16)
    seed: int = 0


def _dices(probs: np.ndarray, refs: np.ndarray) -> list[float]:
    """probs [Q, H, W] (0..1), refs [Q, H, W] -> per-query Dice (NaN when both empty)."""
    return [dice(p >= 0.5, r > 0) for p, r in zip(probs, refs, strict=True)]


def mean_of_support(labels: np.ndarray) -> np.ndarray:
    """The trivial predictor: support masks [S, H, W] (0/1) -> bool [H, W], their pixelwise mean >= 0.5."""
    return np.asarray(labels, dtype=np.float32).mean(0) >= 0.5


def _d(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 0.0 if union == 0 else 1.0 - np.logical_and(a, b).sum() / union


def ged(candidates: np.ndarray, refs: np.ndarray) -> float:
    """Generalised energy distance between candidates [K, H, W] and references [R, H, W] (or one [H, W]),
    all binary: GED^2 = 2 E[d(S, Y)] - E[d(S, S')] - E[d(Y, Y')], d = 1 - IoU (two empty masks: d = 0),
    expectations over all pairs (so identical sets give 0). One reference: the last term is 0."""
    c = np.asarray(candidates, dtype=bool)
    y = np.asarray(refs, dtype=bool)
    y = y[None] if y.ndim == 2 else y
    cross = np.mean([_d(a, b) for a in c for b in y])
    within_c = np.mean([_d(a, b) for a in c for b in c])
    within_y = np.mean([_d(a, b) for a in y for b in y])
    return float(math.sqrt(max(0.0, 2 * cross - within_c - within_y)))


def _nnunet_dice(
    sx: torch.Tensor, sy: torch.Tensor, qx: torch.Tensor, qy: torch.Tensor, steps: int, device: str, seed: int
) -> tuple[float, float]:
    """Train a 'tiny' nnU-Net on the support (S images) and score the queries: (mean Dice, seconds)."""
    from weightzoo.data.slices import Preprocessing, SliceSet
    from weightzoo.train.loop import TrainConfig, train_on_slices

    size = int(sx.shape[-1])
    prep = Preprocessing("percentile", (size, size), 2, 1)
    meta = [{"case": f"s{i}", "subject": f"s{i}", "site": "support", "slice": 0} for i in range(len(sx))]
    train = SliceSet(sx[:, None].numpy(), sy[:, None].numpy().astype(np.uint8), ["task"], meta, prep)
    cfg = TrainConfig(
        tasks=["task"],
        preset="tiny",
        steps=steps,
        batch_size=8,
        optimizer="adam",
        seed=seed,
        device=device,
        size=(size, size),
        val_every=steps,
        checkpoint_every=steps,
    )
    with tempfile.TemporaryDirectory() as tmp:
        res = train_on_slices(train, None, cfg, Path(tmp) / "m", progress=False)
    probs = res.segmenter.predict_batch(qx[:, None].numpy())[:, 0]
    return nanmean(_dices(probs, qy.numpy())), res.seconds


def query_batch(s: int, size: int) -> int:
    """Queries per forward pass: about 32 support entries at 64 px per batch. Larger batches were slower
    on a CPU (1.1 M parameters, 128 px, S = 64: 4.3 s/query at batch 1, 8.5 s at batch 8) and need more
    memory, since each query carries its own support stream."""
    return int(max(1, min(8, 32 // max(1, round(s * (size / 64) ** 2)))))


def _in(sizes: Sequence[int] | None, s: int) -> bool:
    return sizes is None or s in sizes


def _best(cands: np.ndarray, ref: np.ndarray) -> float:
    """Best Dice of candidates [K, H, W] against ref [H, W] (NaN only when every one is NaN)."""
    return nanmean([max((d for d in (dice(c, ref) for c in cands) if not math.isnan(d)), default=math.nan)])


def evaluate_task(
    net: Any,
    task: EvalTask,
    settings: EvalSettings | None = None,
    device: str = "auto",
    log: Callable[[str], None] | None = None,
) -> tuple[list[dict[str, Any]], list[int]]:
    """-> (one row per evaluated S: each method's Dice, mean over draws; the S values skipped because
    they exceed the support pool). See the module docstring."""
    with warnings.catch_warnings():  # a support of one is evaluated on purpose
        warnings.filterwarnings("ignore", "a support of one")
        return _evaluate_task(net, task, settings or EvalSettings(), device, log)


def _evaluate_task(
    net: Any, task: EvalTask, st: EvalSettings, device: str, log: Callable[[str], None] | None
) -> tuple[list[dict[str, Any]], list[int]]:
    from weightzoo.incontext import segment_batch

    q_idx, pool = split_queries(task, st.n_queries, st.seed)
    queries = list(task.images[q_idx].numpy())
    refs = task.labels[q_idx].numpy() > 0  # [Q, H, W]
    ref_sets = refs[:, None]  # [Q, R, H, W]: every rater, for GED
    if task.raters is not None:
        ref_sets = np.concatenate([ref_sets, task.raters[q_idx].numpy() > 0], 1)
    rows: list[dict[str, Any]] = []
    skipped: list[int] = []
    for s in st.support_sizes:
        if s > len(pool):
            skipped.append(s)
            continue
        t0 = time.perf_counter()
        chunk = CHUNK if s >= CHUNK_FROM else None
        batch = query_batch(s, net.spec.size)

        def predict(
            idx: np.ndarray, seed: int, chunk: int | None = chunk, batch: int = batch, **kw: int
        ) -> np.ndarray:
            """-> probabilities [Q, K, H, W] from the support pool[idx]."""
            sx, sy = list(task.images[idx].numpy()), list(task.labels[idx].numpy())
            return np.stack(
                segment_batch(
                    queries, sx, sy, model=net, seed=seed, device=device, batch_size=batch, chunk=chunk, **kw
                )
            )

        acc: dict[str, list[float]] = defaultdict(list)
        probs = []
        for r in range(max(st.repeats, st.ensemble)):
            idx = np.random.default_rng([st.seed, s, r]).choice(pool, s, replace=False)
            p = predict(idx, st.seed + r)[:, 0]
            probs.append(p)
            if r >= st.repeats:  # an extra draw for the ensemble only
                continue
            acc["single"].append(nanmean(_dices(p, refs)))
            base = mean_of_support(task.labels[idx].numpy())
            acc["mean-of-support"].append(nanmean([dice(base, ref) for ref in refs]))
            if st.subsets > 1 and s > 1:
                acc["ensemble-subsets"].append(
                    nanmean(_dices(predict(idx, st.seed + r, ensemble=st.subsets)[:, 0], refs))
                )
            if r == 0 and st.candidates > 1 and _in(st.candidate_sizes, s):
                cands = predict(idx, st.seed, candidates=st.candidates) >= 0.5  # [Q, K, H, W]
                best = [_best(c, ref) for c, ref in zip(cands, refs, strict=True)]
                acc["best-candidate"].append(nanmean(best))
                acc["GED"].append(float(np.mean([ged(c, y) for c, y in zip(cands, ref_sets, strict=True)])))
            if r == 0 and st.nnunet_steps > 0 and _in(st.nnunet_sizes, s):
                sx, sy = task.images[idx], task.labels[idx]
                d, secs = _nnunet_dice(
                    sx, sy, task.images[q_idx], task.labels[q_idx], st.nnunet_steps, device, st.seed
                )
                acc["nnunet"].append(d)
                acc["nnunet-seconds"].append(secs)
        if st.ensemble > 1:
            e = st.ensemble
            acc["ensemble"] = [
                nanmean(_dices(np.mean(probs[i : i + e], 0), refs)) for i in range(0, len(probs) - e + 1, e)
            ]
        row: dict[str, Any] = {"task": task.name, "S": s, "queries": len(q_idx), "pool": len(pool)}
        row.update({k: nanmean(v) for k, v in acc.items()})
        row["single-sd"] = float(np.std(acc["single"])) if len(acc["single"]) > 1 else math.nan  # over draws
        row["single-baseline"] = row["single"] - row["mean-of-support"]
        row["seconds"] = round(time.perf_counter() - t0, 1)
        rows.append(row)
        if log:
            log(_row_line(row))
    if skipped and log:
        log(f"{task.name}: skipped S = {', '.join(map(str, skipped))} (support pool {len(pool)})")
    return rows, skipped


def _row_line(row: dict[str, Any]) -> str:
    keys = ("single", "ensemble", "ensemble-subsets", "mean-of-support", "best-candidate", "GED", "nnunet")
    parts = [f"{k} {row[k]:.3f}" for k in keys if isinstance(row.get(k), float) and not math.isnan(row[k])]
    return f"{row['task']} S={row['S']}: " + ", ".join(parts) + f" ({row['seconds']} s)"


def device_line(net: torch.nn.Module) -> str:
    """'cpu (AMD EPYC ..., 1 threads)' or 'cuda (NVIDIA ...)' for the device the net is on."""
    dev = next(net.parameters()).device
    if dev.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(dev)})"
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu ({name}, {torch.get_num_threads()} threads)"


def run_evaluation(
    model: str | Path | Any | None,
    tasks: Sequence[str] = DEFAULT_TASKS,
    out: str | Path = "incontext_eval",
    settings: EvalSettings | None = None,
    data_root: str | Path | None = None,
    device: str = "auto",
    log: Callable[[str], None] | None = print,
    loaded: dict[tuple[str, int], EvalTask] | None = None,
) -> dict[str, Any]:
    """Evaluate one model (folder, loaded InContextNet, or None = shipped) on held-out tasks; writes
    out/results.json, out/results.md, out/report.html (+ figures/dice_vs_support.png) and returns the
    result. `loaded` caches tasks by (name, grid size) across calls. Real tasks need the real-data
    folder (`data_root`, else $WEIGHTZOO_DATA): InputError if it is missing."""
    from weightzoo.incontext import load_model
    from weightzoo.incontext.model import count_parameters

    st = settings or EvalSettings()
    out = Path(out)
    net = load_model(model, device)
    size = net.spec.size
    loaded = {} if loaded is None else loaded
    todo = [n for n in tasks if (n, size) not in loaded]
    for t in load_tasks(todo, data_root, size, out / "cache", st.limit):  # all first: fail before any work
        loaded[(t.name, size)] = t
    t0 = time.perf_counter()
    rows: list[dict[str, Any]] = []
    info = []
    for name in tasks:
        task = loaded[(name, size)]
        task_rows, skipped = evaluate_task(net, task, st, device, log)
        rows += task_rows
        q_idx, pool = split_queries(task, st.n_queries, st.seed)
        rater_dice = None
        if task.raters is not None:
            rater_dice = nanmean(_dices(task.raters[q_idx, 0].numpy(), task.labels[q_idx].numpy()))
        info.append(
            {
                "name": name,
                "real": task.real,
                "source": task.source,
                "images": len(task.groups),
                "groups": len(set(task.groups)),
                "queries": len(q_idx),
                "pool": len(pool),
                "skipped_sizes": skipped,
                "rater_dice": rater_dice,
            }
        )
    means, checks = summarize(rows)
    meta = getattr(net, "meta", {}) or {}
    result = {
        "model": str(model) if isinstance(model, (str, Path)) else ("shipped" if model is None else "given"),
        "n_params": count_parameters(net),
        "size": size,
        "model_meta": {k: meta.get(k) for k in ("spec", "steps", "seconds", "device")},
        "env": {
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "device": device_line(net),
            "torch": torch.__version__,
        },
        "settings": asdict(st),
        "tasks": list(tasks),
        "task_info": info,
        "rows": rows,
        "mean_rows": means,
        "checks": checks,
        "universeg": {
            "citation": UNIVERSEG_CITATION,
            "single": UNIVERSEG_SINGLE,
            "ensemble": UNIVERSEG_ENSEMBLE,
        },
        "seconds": round(time.perf_counter() - t0, 1),
    }
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "results.json", jsonable(result))
    atomic_write_bytes(out / "results.md", results_markdown(result).encode())
    result["report"] = report(out, result)
    return result
