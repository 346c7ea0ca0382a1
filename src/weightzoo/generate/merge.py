"""Baselines for "one network for several tasks": merging single-task specialists from the zoo.

Methods (body = every tensor but the seg layers):
  average          body = mean of the specialists' bodies (model soup / weight averaging)
  task-arithmetic  body = θ0 + λ·Σ_k (θ_k − θ0)  (Ilharco et al., 2023)
  ties             TIES-merging (Yadav et al., 2023): each task vector θ_k − θ0 keeps its top
                   `density` fraction of entries by magnitude (trim), a sign per entry is elected
                   from the summed trimmed vectors, and the entries that agree with it are averaged
                   (disjoint mean); body = θ0 + λ·merged
  dare             DARE (Yu et al., 2024): each entry of each task vector is dropped with probability
                   `drop` and the kept ones are rescaled by 1/(1 − drop) (a seeded draw), then task
                   arithmetic: body = θ0 + λ·Σ_k dare(θ_k − θ0); drop = 0 is task arithmetic exactly
Task arithmetic, TIES and DARE need a common starting point θ0:
  * specialists fine-tuned from one base (a zoo grid with `from:`, weightzoo.zoo.base): θ0 is the base
    restricted to the merged tasks; specialists are single-task fine-tunes of that base with the same
    site, seed and recipe;
  * otherwise the specialists must be runs of one seed (same body initialisation; checked on their
    stored "init" checkpoints), and θ0 is that initialisation.

Seg layers: a K-task network has one sigmoid output channel per task, so output row k of every seg
layer (`decoder.seg_layers.*`, weight [K, C, 1, 1] and bias [K]) belongs to task k alone. Those rows
are NOT merged: row k is copied from task k's specialist (its only output row), on top of the merged
body. (Only the last seg layer is used at inference; the others are stacked the same way so the
state is complete.)

λ: given, or chosen on the VALIDATION split from `LAMBDAS` when a dataset is at hand (mean val
Dice over the tasks); without data, 1/K for task arithmetic (= averaging when all share θ0) would be
pointless, so DEFAULT_LAMBDA is used instead.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from weightzoo.errors import InputError, UnknownNameError
from weightzoo.generate.vectors import TaskLayout, base_key

METHODS = ("average", "task-arithmetic", "ties", "dare")
LAMBDAS = (0.3, 0.5, 0.7, 1.0)
DEFAULT_LAMBDA = {"task-arithmetic": 0.5, "ties": 1.0, "dare": 0.5}
DEFAULT_DENSITY = 0.2
DEFAULT_DROP = 0.9


def body_mask(layout: TaskLayout) -> torch.Tensor:
    """[numel] bool: True for body elements (not seg layers)."""
    m = torch.ones(layout.numel, dtype=torch.bool)
    for s in layout.seg:
        m[s.offset : s.offset + s.row * s.rows] = False
    return m


def ties_vector(task_vectors: torch.Tensor, density: float = DEFAULT_DENSITY) -> torch.Tensor:
    """TIES merge of task vectors [K, n] -> [n]: trim to the top `density` by magnitude (per task),
    elect the sign of the summed trimmed vectors, average the entries that agree with it."""
    if not 0 < density <= 1:
        raise InputError(f"density {density} is not in (0, 1]", "e.g. --density 0.2")
    K, n = task_vectors.shape
    keep = max(1, math.ceil(density * n))
    trimmed = torch.zeros_like(task_vectors)
    for k in range(K):
        idx = task_vectors[k].abs().topk(keep).indices
        trimmed[k, idx] = task_vectors[k, idx]
    sign = torch.sign(trimmed.sum(0))
    agree = (torch.sign(trimmed) == sign) & (trimmed != 0)
    return (trimmed * agree).sum(0) / agree.sum(0).clamp_min(1)


def dare_vectors(task_vectors: torch.Tensor, drop: float = DEFAULT_DROP, seed: int = 0) -> torch.Tensor:
    """DARE: drop each entry of the task vectors [K, n] with probability `drop` (seeded), rescale the
    kept ones by 1 / (1 - drop). drop = 0 returns the task vectors unchanged."""
    if not 0 <= drop < 1:
        raise InputError(f"drop rate {drop} is not in [0, 1)", "e.g. --drop 0.9")
    g = torch.Generator().manual_seed(int(seed))
    keep = torch.rand(task_vectors.shape, generator=g) >= drop
    return task_vectors * keep / (1.0 - drop)


def merge_vectors(
    layout: TaskLayout,
    specialists: Sequence[torch.Tensor],
    tasks: Sequence[str],
    method: str,
    init: torch.Tensor | None = None,
    lam: float | None = None,
    density: float = DEFAULT_DENSITY,
    drop: float = DEFAULT_DROP,
    dare_seed: int = 0,
) -> torch.Tensor:
    """Merge specialist vectors (task layout; specialist k has its row for tasks[k]) -> [numel].

    init: the common starting point θ0 (task layout), required by task-arithmetic, ties and dare."""
    if method not in METHODS:
        raise UnknownNameError("merge method", method, METHODS)
    if len(specialists) != len(tasks) or not tasks:
        raise InputError(
            f"{len(specialists)} specialists for tasks {list(tasks)}", "give one specialist per task"
        )
    S = torch.stack([s.float() for s in specialists])
    body = body_mask(layout)
    if method == "average":
        merged = S.mean(0)
    else:
        if init is None:
            raise InputError(
                f"{method} needs the specialists' common initialisation (or their shared base)",
                "use runs of one seed, or fine-tunes of one base",
            )
        lam = DEFAULT_LAMBDA[method] if lam is None else float(lam)
        tv = S - init.float()
        merged = init.float().clone()
        if method == "ties":
            merged[body] += lam * ties_vector(tv[:, body], density)
        else:
            if method == "dare":
                tv = dare_vectors(tv, drop, dare_seed)
            merged += lam * tv.sum(0)
    out = torch.zeros(layout.numel)
    out[body] = merged[body]
    for k, t in enumerate(tasks):  # seg rows: each task's from its own specialist
        row = layout.mask([t]) & ~body
        out[row] = S[k, row]
    return out


# ---- from the zoo -----------------------------------------------------------------------------------
@dataclass
class Specialists:
    """One single-task run per task, all of one seed and site set (a common initialisation), and for
    fine-tunes the id of their shared base (weightzoo.zoo.base)."""

    tasks: list[str]
    runs: list[Any]  # RunRecord per task
    finals: list[Any]  # CheckpointRecord per task (the run's final checkpoint)
    inits: list[Any | None]  # CheckpointRecord of the run's initialisation (step 0), if stored
    seed: int | None
    sites: list[str]
    base: str | None = None


def find_specialists(
    zoo: Any, tasks: Sequence[str], site: str | None = None, seed: int | None = None, split: str = "train"
) -> Specialists:
    """The best group of single-task runs (one per task, same seed, sites, body, recipe and base) of
    `split` runs, ranked by the mean final val Dice."""
    tasks = list(tasks)
    known = sorted({t for r in zoo.runs() for t in r.tasks})
    for t in tasks:
        if t not in known:
            raise UnknownNameError("task", t, known, zoo.path)
    groups: dict[tuple, dict[str, tuple[Any, Any]]] = {}
    for t in tasks:
        for r in zoo.runs(task=t, site=site, split=split):
            if len(r.tasks) != 1 or (seed is not None and r.seed != seed):
                continue
            finals = zoo.checkpoints(run_id=r.run_id, kind="final") or zoo.checkpoints(
                run_id=r.run_id, order_by="-step", limit=1
            )
            if not finals:
                continue
            key = (
                r.seed,
                tuple(r.sites),
                base_key(zoo.spec(r.arch_hash)),
                json_key(r.config, t),
                zoo.run_base(r.run_id),
            )
            prev = groups.setdefault(key, {}).get(t)
            if prev is None or _dice(finals[-1], t) > _dice(prev[1], t):
                groups[key][t] = (r, finals[-1])
    full = {k: g for k, g in groups.items() if all(t in g for t in tasks)}
    if not full:
        where = f" on site {site}" if site else ""
        raise InputError(
            f"the zoo has no single-task {split} runs of {', '.join(tasks)}{where} that share a seed and setup",
            "build the zoo with a grid whose tasks list each task alone, with the same seeds",
            zoo.path,
        )
    key = max(full, key=lambda k: sum(_dice(full[k][t][1], t) for t in tasks))
    runs = [full[key][t][0] for t in tasks]
    finals = [full[key][t][1] for t in tasks]
    inits = []
    for r in runs:
        c = zoo.checkpoints(run_id=r.run_id, metric="step", max_value=0)
        inits.append(c[0] if c else None)
    return Specialists(tasks, runs, finals, inits, key[0], list(key[1]), key[4])


def json_key(config: dict[str, Any], task: str) -> str:
    """A run's recipe without its task, to group specialists trained alike."""
    import json

    return json.dumps({k: v for k, v in config.items() if k not in ("tasks", "device")}, sort_keys=True)


def _dice(rec: Any, task: str) -> float:
    v = rec.metrics.get(task, {}).get("val_dice")
    return -1.0 if v is None else float(v)


@dataclass
class MergeResult:
    vector: torch.Tensor
    layout: TaskLayout
    tasks: list[str]
    method: str
    lam: float | None
    val_dice: dict[str, float] | None
    specialists: Specialists
    seconds: float
    lam_scores: dict[str, float]
    params: dict[str, Any] = field(default_factory=dict)  # the method's own: density, drop, dare_seed


def common_start(zoo: Any, sp: Specialists, layout: TaskLayout, method: str) -> torch.Tensor:
    """θ0 of the specialists as a `layout` vector: their base restricted to the layout's tasks
    (fine-tunes), or else their shared initialisation (the runs' step-0 checkpoints)."""
    if sp.base is not None:
        return layout.embed(zoo.base(sp.base).restricted(layout.tasks)[1], layout.tasks)[0]
    if any(c is None for c in sp.inits):
        raise InputError(
            f"{method} needs the specialists' initialisations (step 0) in the zoo",
            "use --method average",
            zoo.path,
        )
    inits = [layout.embed(zoo.load(c), r.tasks)[0] for c, r in zip(sp.inits, sp.runs, strict=True)]
    bm = body_mask(layout)
    if any(not torch.allclose(i[bm], inits[0][bm]) for i in inits[1:]):
        raise InputError(
            f"the specialists of {', '.join(layout.tasks)} do not share an initialisation",
            "use --method average",
        )
    return inits[0]


def merge_zoo(
    zoo: Any,
    tasks: Sequence[str],
    method: str,
    site: str | None = None,
    seed: int | None = None,
    lam: float | None = None,
    density: float = DEFAULT_DENSITY,
    dataset: Any | None = None,
    prep: Any | None = None,
    drop: float = DEFAULT_DROP,
    dare_seed: int = 0,
) -> MergeResult:
    """Merge the zoo's specialists for `tasks` into one K-task network (see the module docstring).

    dataset: a RawDataset (or path) whose VALIDATION split picks λ from LAMBDAS when `lam` is None."""
    if method not in METHODS:
        raise UnknownNameError("merge method", method, METHODS)
    t0 = time.perf_counter()
    tasks = list(tasks)
    sp = find_specialists(zoo, tasks, site, seed)
    layout = TaskLayout(zoo.spec(sp.runs[0].arch_hash), tasks)
    specs = [layout.embed(zoo.load(c), r.tasks)[0] for c, r in zip(sp.finals, sp.runs, strict=True)]
    init = None if method == "average" else common_start(zoo, sp, layout, method)
    params = {"ties": {"density": density}, "dare": {"drop": drop, "dare_seed": dare_seed}}.get(method, {})
    val = None if dataset is None else val_slices(dataset, tasks, prep, sp.sites)

    def merged(lam: float | None) -> torch.Tensor:
        return merge_vectors(layout, specs, tasks, method, init, lam, density, drop, dare_seed)

    lam_scores: dict[str, float] = {}
    val_dice = None
    if method != "average" and lam is None and val is not None:
        best = -math.inf
        for cand in LAMBDAS:
            d = pseudo_dice(network(layout, merged(cand), tasks), val, tasks)
            score = mean_score(d.values())
            lam_scores[f"{cand:g}"] = score
            if score > best:
                best, lam, val_dice = score, cand, d
    if method != "average" and lam is None:
        lam = DEFAULT_LAMBDA[method]
    vec = merged(lam)
    if val_dice is None and val is not None:
        val_dice = pseudo_dice(network(layout, vec, tasks), val, tasks)
    return MergeResult(
        vec, layout, tasks, method, lam, val_dice, sp, time.perf_counter() - t0, lam_scores, params
    )


def mean_score(values: Any) -> float:
    """Mean of the finite values (a Dice per task), -inf when there is none: a score to maximise."""
    v = [x for x in values if x is not None and math.isfinite(x)]
    return sum(v) / len(v) if v else -math.inf


def network(layout: TaskLayout, vec: torch.Tensor, tasks: Sequence[str]) -> torch.nn.Module:
    from weightzoo.nets.unet import build_network, load_real_state_dict

    return load_real_state_dict(build_network(layout.out_spec(tasks)), layout.extract(vec, tasks))


def val_slices(dataset: Any, tasks: Sequence[str], prep: Any, sites: Sequence[str] | None) -> Any:
    """The SliceSet of the dataset's VALIDATION cases of `sites` (never test) for `tasks`."""
    from weightzoo.data.raw import RawDataset
    from weightzoo.data.slices import load_slices

    ds = dataset if isinstance(dataset, RawDataset) else RawDataset.open(dataset)
    cases = ds.cases_in("val", list(sites) if sites else None)
    if not cases:
        raise InputError(
            "the dataset has no validation cases for these sites", "give a dataset with a val split", ds.root
        )
    return load_slices(ds, list(tasks), prep=prep, cases=cases)


@torch.no_grad()
def pseudo_dice(net: torch.nn.Module, val: Any, tasks: Sequence[str]) -> dict[str, float]:
    """Pseudo Dice per task (the zoo's val_dice) of `net` (outputs `tasks`) on the SliceSet `val`."""
    from weightzoo.train.loop import evaluate_slices
    from weightzoo.train.losses import DiceBCELoss

    _, dice = evaluate_slices(net, val, DiceBCELoss(), torch.device("cpu"))
    return dict(zip(tasks, dice, strict=True))


def save_merged(result: MergeResult, out: str | Path, prep: Any, info: dict[str, Any] | None = None) -> Path:
    """Write the merged network as a weightzoo model folder (route "merge")."""
    from weightzoo.nets.unet import check_state_dict
    from weightzoo.segmenter import save_model

    state = result.layout.extract(result.vector, result.tasks)
    spec = result.layout.out_spec(result.tasks)
    check_state_dict(spec, state, "merged weights")
    net = network(result.layout, result.vector, result.tasks)
    sp = result.specialists
    meta = {
        "method": result.method,
        "lambda": result.lam,
        "lambda_val_scores": result.lam_scores,
        "val_dice": result.val_dice,
        "specialists": {t: c.ckpt_id for t, c in zip(sp.tasks, sp.finals, strict=True)},
        "seed": sp.seed,
        "sites": sp.sites,
        **({"base": sp.base} if sp.base else {}),
        **result.params,
        **(info or {}),
    }
    return save_model(out, net, spec, result.tasks, prep, result.seconds, route="merge", info=meta)
