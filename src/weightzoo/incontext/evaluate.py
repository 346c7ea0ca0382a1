"""Evaluate an in-context model on held-out tasks: Dice vs support size, ensembling, candidates, nnU-Net.

Held-out tasks (never used in training, see weightzoo.incontext.tasks.HELD_OUT):
  wbc-nucleus, wbc-cell      WBC 'Dataset 1' (120 px RGB -> gray), nucleus / whole cell
  wbc2-nucleus, wbc2-cell    WBC 'Dataset 2' (300 px)
  sct-cord                   SCT T2 axial slices (t2/t2.nii.gz, 55 slices with cord), one subject
  sct-cord-t1                SCT T1 axial slices (t1/t1w.nii.gz)
  sct-gm                     SCT T2* gray matter (t2s_uncropped, 11 slices cropped around the cord)
  phantom-canal              phantom canal at site B (T2-like), a task never trained on
  phantom-D-cord             phantom cord at the unseen site D (PD-like contrast)

For each task the images are split once (seeded) into queries (up to `n_queries`; by subject where
there are subjects) and a support pool. For each support size N (<= pool size), `repeats` random
draws of N examples; per draw, the mean query Dice of:
  single           one prediction from the N examples
  ensemble-subsets `ensemble=4`: 4 random subsets of 3/4 of the same N examples, averaged
  ensemble-draws   4 independent draws of N examples from the pool, averaged (UniverSeg's
                   ensembling; uses up to 4N labelled examples)
  candidates       5 candidates: best-candidate Dice (oracle pick per query), and GED with the one
                   reference mask available: GED^2 = 2 E[d(S, Y)] - E[d(S, S')], d = 1 - IoU
  nnunet           a 'tiny' nnU-Net trained on the same N examples (`nnunet_steps` steps)
Dice is computed on the model grid (64 px, padded square) and averaged over queries whose
reference or prediction is non-empty (nnU-Net's rule: both empty = no score).
"""

from __future__ import annotations

import math
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from weightzoo.errors import InputError, UnknownNameError
from weightzoo.evaluate.metrics import dice
from weightzoo.fileio import atomic_write_json
from weightzoo.incontext.tasks import label_to_model_grid, to_model_grid

EVAL_TASKS = (
    "wbc-nucleus",
    "wbc-cell",
    "wbc2-nucleus",
    "wbc2-cell",
    "sct-cord",
    "sct-cord-t1",
    "sct-gm",
    "phantom-canal",
    "phantom-D-cord",
)
DEFAULT_TASKS = ("wbc-nucleus", "wbc-cell", "sct-cord", "sct-gm", "phantom-canal", "phantom-D-cord")


@dataclass
class EvalTask:
    """A held-out task on the model grid: images/labels [N, size, size]; groups name the subject/volume."""

    name: str
    images: torch.Tensor
    labels: torch.Tensor
    groups: list[str]
    source: str


def _grid(xs: Sequence[np.ndarray], ys: Sequence[np.ndarray], size: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.stack([to_model_grid(a, size) for a in xs])
    y = torch.stack([(label_to_model_grid(b.astype(np.float32), size) >= 0.5).float() for b in ys])
    return x, y


def _wbc(root: Path, folder: str, task: str, size: int, limit: int) -> tuple[list, list, list]:
    from weightzoo.data.importers import WBC_CLASSES, map_to_nearest
    from weightzoo.data.io import read_image

    src = root / "wbc" / folder
    if not src.is_dir():
        raise InputError("WBC folder not found", "give --data with the real-data root that holds wbc/", src)
    xs, ys, gs = [], [], []
    for p in sorted(src.glob("*.bmp"))[:limit]:
        m, _ = map_to_nearest(read_image(p.with_suffix(".png")).array.max(0), WBC_CLASSES)
        xs.append(read_image(p).array)
        ys.append(m == 2 if task == "nucleus" else m > 0)  # indices: 0 bg, 1 cytoplasm, 2 nucleus
        gs.append(p.stem)
    return xs, ys, gs


def _nifti_slices(image: Path, mask: Path, crop: int | None = None) -> tuple[list, list, list]:
    from weightzoo.data.io import read_image, read_mask

    img = read_image(image)
    m = read_mask(mask, like=img) > 0
    x = img.array[0]
    if crop:  # a window around the mask's centre (e.g. the cord in an uncropped 320 px FOV)
        cx, cy = (round(float(np.mean(a))) for a in np.nonzero(m)[:2])
        h = crop // 2
        x = x[max(0, cx - h) : cx + h, max(0, cy - h) : cy + h]
        m = m[max(0, cx - h) : cx + h, max(0, cy - h) : cy + h]
    zs = [z for z in range(m.shape[2]) if m[:, :, z].any()]
    return [x[:, :, z] for z in zs], [m[:, :, z] for z in zs], [f"{image.name}:{z}" for z in zs]


def _phantom(task: str, site: str, size: int, cache: Path) -> tuple[list, list, list]:
    from weightzoo.data.raw import RawDataset
    from weightzoo.data.slices import load_case
    from weightzoo.data.synth import make_phantom_dataset

    found = sorted(cache.glob("Dataset*_EvalPhantom")) if cache.exists() else []
    ds = (
        RawDataset.open(found[0])
        if found
        else make_phantom_dataset(cache, 4, 8, size, 8, 4242, name="EvalPhantom")
    )
    xs, ys, gs = [], [], []
    for case in ds.cases_in(None, [site]):
        img, lab = load_case(ds, case)
        m = np.isin(lab, ds.task_labels(task))
        for z in range(m.shape[2]):
            if m[:, :, z].any():
                xs.append(img.array[0, :, :, z])
                ys.append(m[:, :, z])
                gs.append(ds.subject(case))
    return xs, ys, gs


def load_eval_task(name: str, data_root: Path | None, size: int, cache: Path, limit: int = 120) -> EvalTask:
    """Build one held-out task (see the module docstring) on the model grid."""
    if name not in EVAL_TASKS:
        raise UnknownNameError("held-out task", name, EVAL_TASKS)
    if name.startswith("phantom"):
        xs, ys, gs = (
            _phantom("canal", "B", size, cache)
            if name == "phantom-canal"
            else _phantom("cord", "D", size, cache)
        )
        src = "weightzoo.data.synth phantoms (seed 4242)"
    else:
        if data_root is None or not Path(data_root).is_dir():
            raise InputError(
                f"real data for '{name}' not found",
                "give --data pointing at the shared data folder",
                data_root,
            )
        root = Path(data_root)
        if name.startswith("wbc"):
            folder = "Dataset 1" if name.startswith("wbc-") else "Dataset 2"
            xs, ys, gs = _wbc(root, folder, name.split("-")[1], size, limit)
            src = f"wbc/{folder}"
        else:
            sct = root / "sct_testing_data"
            files = {
                "sct-cord": ("t2/t2.nii.gz", "t2/t2_seg-manual.nii.gz", None),
                "sct-cord-t1": ("t1/t1w.nii.gz", "t1/t1w_seg-manual.nii.gz", None),
                "sct-gm": ("t2s/t2s_uncropped.nii.gz", "t2s/t2s_uncropped_gmseg_manual.nii.gz", 64),
            }[name]
            xs, ys, gs = _nifti_slices(sct / files[0], sct / files[1], files[2])
            src = f"sct_testing_data/{files[0]}"
    x, y = _grid(xs, ys, size)
    return EvalTask(name, x, y, gs, src)


def split_queries(task: EvalTask, n_queries: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(query indices, pool indices): whole groups go to the queries until there are enough of them,
    if the task has several groups; at most a third of the task becomes queries."""
    rng = np.random.default_rng(seed)
    n = len(task.groups)
    want = max(1, min(n_queries, n // 3))
    groups = sorted(set(task.groups))
    if len(groups) > 1 and len(groups) < n:
        q: list[int] = []
        for gname in rng.permutation(groups):
            if len(q) >= want:
                break
            q += [i for i, g in enumerate(task.groups) if g == gname]
        q_idx = np.array(sorted(q[: max(want, 1)]))
    else:
        q_idx = np.sort(rng.choice(n, want, replace=False))
    pool = np.array([i for i in range(n) if i not in set(q_idx.tolist())])
    return q_idx, pool


def _dices(probs: np.ndarray, refs: np.ndarray) -> list[float]:
    """probs [Q, H, W] (0..1), refs [Q, H, W] -> per-query Dice (NaN when both empty)."""
    return [dice(p >= 0.5, r > 0) for p, r in zip(probs, refs, strict=True)]


def _mean(vals: Sequence[float]) -> float:
    v = [x for x in vals if not math.isnan(x)]
    return float(np.mean(v)) if v else math.nan


def ged(candidates: np.ndarray, ref: np.ndarray) -> float:
    """Generalised energy distance with one reference: candidates [K, H, W] binary, ref [H, W].
    d = 1 - IoU (two empty masks: d = 0)."""

    def d(a: np.ndarray, b: np.ndarray) -> float:
        union = np.logical_or(a, b).sum()
        return 0.0 if union == 0 else 1.0 - np.logical_and(a, b).sum() / union

    k = len(candidates)
    cross = np.mean([d(c, ref) for c in candidates])
    within = np.mean([d(candidates[i], candidates[j]) for i in range(k) for j in range(k)]) if k > 1 else 0.0
    return float(math.sqrt(max(0.0, 2 * cross - within)))


def _nnunet_dice(
    sx: torch.Tensor, sy: torch.Tensor, qx: torch.Tensor, qy: torch.Tensor, steps: int, device: str, seed: int
) -> tuple[float, float]:
    """Train a 'tiny' nnU-Net on the support (N images) and score the queries: (mean Dice, seconds)."""
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
    return _mean(_dices(probs, qy.numpy())), res.seconds


def evaluate_task(
    net: Any,
    task: EvalTask,
    support_sizes: Sequence[int],
    repeats: int = 2,
    n_queries: int = 12,
    ensemble: int = 4,
    candidates: int = 5,
    nnunet_steps: int = 0,
    nnunet_sizes: Sequence[int] | None = None,
    seed: int = 0,
    device: str = "auto",
    log: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """One row per support size N: mean (over draws) of each method's mean query Dice; see module doc."""
    with warnings.catch_warnings():  # a support of one is evaluated on purpose
        warnings.filterwarnings("ignore", "a support of one")
        return _evaluate_task(
            net,
            task,
            support_sizes,
            repeats,
            n_queries,
            ensemble,
            candidates,
            nnunet_steps,
            nnunet_sizes,
            seed,
            device,
            log,
        )


def _evaluate_task(
    net: Any,
    task: EvalTask,
    support_sizes: Sequence[int],
    repeats: int,
    n_queries: int,
    ensemble: int,
    candidates: int,
    nnunet_steps: int,
    nnunet_sizes: Sequence[int] | None,
    seed: int,
    device: str,
    log: Callable[[str], None] | None,
) -> list[dict[str, Any]]:
    from weightzoo.incontext import segment_batch

    q_idx, pool = split_queries(task, n_queries, seed)
    qx, qy = task.images[q_idx], task.labels[q_idx]
    refs = qy.numpy()
    queries = list(qx.numpy())
    rows = []
    for n in support_sizes:
        if n > len(pool):
            continue
        acc: dict[str, list[float]] = {}
        t0 = time.perf_counter()
        for r in range(repeats):
            rng = np.random.default_rng([seed, n, r])

            def draw(rng: np.random.Generator = rng, n: int = n) -> tuple[list[np.ndarray], list[np.ndarray]]:
                idx = rng.choice(pool, n, replace=False)
                return list(task.images[idx].numpy()), list(task.labels[idx].numpy() > 0)

            sx, sy = draw()
            kw = dict(model=net, seed=seed + r, device=device)
            single = np.stack([p[0] for p in segment_batch(queries, sx, sy, **kw)])
            acc.setdefault("single", []).append(_mean(_dices(single, refs)))
            if ensemble > 1 and n > 1:
                ens = np.stack([p[0] for p in segment_batch(queries, sx, sy, ensemble=ensemble, **kw)])
                acc.setdefault("ensemble-subsets", []).append(_mean(_dices(ens, refs)))
            if ensemble > 1:
                draws = [single] + [
                    np.stack([p[0] for p in segment_batch(queries, *draw(), **kw)])
                    for _ in range(ensemble - 1)
                ]
                acc.setdefault("ensemble-draws", []).append(_mean(_dices(np.mean(draws, 0), refs)))
            if candidates > 1:
                cands = np.stack(segment_batch(queries, sx, sy, candidates=candidates, **kw))  # [Q, K, H, W]
                best = [
                    max(
                        (d for d in _dices(c, np.repeat(ref[None], len(c), 0)) if not math.isnan(d)),
                        default=math.nan,
                    )
                    for c, ref in zip(cands, refs, strict=True)
                ]
                acc.setdefault("best-candidate", []).append(_mean(best))
                acc.setdefault("GED", []).append(
                    float(np.mean([ged(c >= 0.5, ref > 0) for c, ref in zip(cands, refs, strict=True)]))
                )
            if nnunet_steps > 0 and r == 0 and (nnunet_sizes is None or n in nnunet_sizes):
                sxt, syt = torch.from_numpy(np.stack(sx)), torch.from_numpy(np.stack(sy)).float()
                d, secs = _nnunet_dice(sxt, syt, qx, qy, nnunet_steps, device, seed)
                acc["nnunet"] = [d]
                acc["nnunet_seconds"] = [secs]
        row = {"task": task.name, "N": n, "queries": len(q_idx), "pool": len(pool)}
        row.update({k: _mean(v) for k, v in acc.items()})
        row["seconds"] = round(time.perf_counter() - t0, 1)
        rows.append(row)
        if log:
            log(_row_line(row))
    return rows


def _row_line(row: dict[str, Any]) -> str:
    parts = [f"{k} {v:.3f}" for k, v in row.items() if isinstance(v, float) and k not in ("seconds",)]
    return f"{row['task']} N={row['N']}: " + ", ".join(parts)


def markdown_table(rows: list[dict[str, Any]], cols: Sequence[str]) -> str:
    """Rows -> a GitHub markdown table of the given columns (missing values: –)."""

    def fmt(v: Any) -> str:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "–"
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


TABLE_COLS = ("task", "N", "single", "ensemble-subsets", "ensemble-draws", "best-candidate", "GED", "nnunet")


def run_evaluation(
    model: str | Path | None,
    tasks: Sequence[str],
    support_sizes: Sequence[int],
    out: str | Path,
    data_root: str | Path | None = None,
    repeats: int = 2,
    n_queries: int = 12,
    nnunet_steps: int = 150,
    nnunet_sizes: Sequence[int] | None = (1, 4, 16, 64),
    seed: int = 0,
    device: str = "auto",
    log: Callable[[str], None] | None = print,
) -> dict[str, Any]:
    """Evaluate on held-out tasks; writes out/results.json, out/results.md and out/report.html."""
    from weightzoo.incontext import load_model

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    # No default data root: the package never depends on where a checkout keeps its test data.
    # Tasks that need real data are skipped (with the reason) when --data is not given.
    net = load_model(model, device)
    t0 = time.perf_counter()
    rows: list[dict[str, Any]] = []
    skipped: dict[str, str] = {}
    for name in tasks:
        try:
            task = load_eval_task(name, Path(data_root) if data_root else None, net.spec.size, out / "cache")
        except InputError as e:
            if name.startswith("phantom"):
                raise
            skipped[name] = str(e)  # real data absent: say so, evaluate the rest
            if log:
                log(f"skipped {name}: {e}")
            continue
        rows += evaluate_task(
            net, task, support_sizes, repeats, n_queries, 4, 5, nnunet_steps, nnunet_sizes, seed, device, log
        )
    result = {
        "model": str(model) if model is not None else "shipped",
        "model_meta": {
            k: getattr(net, "meta", {}).get(k) for k in ("spec", "steps", "seconds", "device", "n_params")
        },
        "tasks": list(tasks),
        "support_sizes": list(support_sizes),
        "repeats": repeats,
        "n_queries": n_queries,
        "nnunet_steps": nnunet_steps,
        "rows": rows,
        "skipped": skipped,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    atomic_write_json(out / "results.json", _jsonable(result))
    (out / "results.md").write_text(markdown_table(rows, TABLE_COLS) + "\n")
    result["report"] = _report(out, result)
    return result


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and math.isnan(x):
        return None
    return x


def _report(out: Path, result: dict[str, Any]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from weightzoo.evaluate.report import Report

    rows = result["rows"]
    rep = Report(out, "weightzoo in-context evaluation (held-out tasks)")
    rep.section(
        "Held-out tasks",
        "Tasks never used in training. Dice per support size N (mean over random support draws and queries); "
        "nnunet = a tiny nnU-Net trained on the same N examples.",
    )
    rep.table([{c: r.get(c) for c in TABLE_COLS} for r in rows], caption="Dice vs support size")
    names = sorted({r["task"] for r in rows})
    if names:
        fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3), squeeze=False)
        for ax, name in zip(axes[0], names, strict=True):
            rs = [r for r in rows if r["task"] == name]
            for key in ("single", "ensemble-draws", "best-candidate", "nnunet"):
                pts = [(r["N"], r[key]) for r in rs if r.get(key) is not None and not math.isnan(r[key])]
                if pts:
                    ax.plot(*zip(*pts, strict=True), marker="o", label=key)
            ax.set_xscale("log", base=2)
            ax.set(title=name, xlabel="support size N", ylim=(0, 1))
        axes[0][0].set_ylabel("Dice")
        axes[0][-1].legend(fontsize=7)
        rep.figure(fig, "dice_vs_support", "Held-out Dice vs support size.")
    if result["skipped"]:
        rep.text("Skipped: " + "; ".join(f"{k}: {v}" for k, v in result["skipped"].items()), note=True)
    return rep.write(meta=f"model {result['model']} · {result['seconds']} s")
