"""Model soups (Wortsman et al., 2022): weight averages of fine-tunes of ONE base network.

Fine-tunes of one base stay in the base's basin of weight space, so their average is a working
network that keeps or beats the best single fine-tune. Runs from different random inits lie in
different basins (hidden units in other orders): their average is a broken network (Dice 0), so
they are refused.

Contract:
  uniform_soup(states) -> state
      the element-wise float32 mean of state dicts of one architecture (and, when `task_lists` is
      given, one task order); anything else is an InputError.
  greedy_soup(candidates, score) -> (state, chosen_ids, log)
      Wortsman's greedy soup: candidates ({id: state}) sorted by their own score, best first; the soup
      starts as the best one and each next candidate is kept only if score(average of the kept ones
      and it) does not decrease. `score(state) -> float` is any callable (higher is better; NaN counts
      as -inf); `log` has one entry per candidate (id, own score, soup score with it, kept).
  select_candidates(zoo, tasks, site, trainable=None, base_id=None) -> Candidates
      the ingredients: the FINAL checkpoints of DONE runs of run split train or val (never the zoo's
      test runs) that were fine-tuned from one base, whose task set is exactly `tasks` (their seg rows
      reordered to `tasks`' order), whose sites include `site` and, if given, whose `trainable` subset
      is `trainable`. No fine-tunes but runs from random inits: a one-line InputError saying why.
  ValScorer(dataset, spec, tasks, prep, site)
      score(state) = mean pseudo Dice (the zoo's val_dice) over `tasks` on the dataset's VALIDATION
      subjects of `site`; never the test subjects.
  make_soup(zoo, tasks, site, method="uniform"|"greedy", ...) -> Soup; save_soup(soup, out) writes an
      ordinary model folder (route "soup") that `segment`, `evaluate` and `zoo export` accept.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from weightzoo.data.raw import RawDataset
from weightzoo.data.slices import Preprocessing
from weightzoo.errors import InputError, UnknownNameError
from weightzoo.nets.unet import ArchSpec, build_network, load_real_state_dict
from weightzoo.zoo.base import SUBSETS, restrict_to_tasks

METHODS = ("uniform", "greedy")
INGREDIENT_SPLITS = ("train", "val")  # run splits a soup may use: the zoo's test runs never
State = Mapping[str, torch.Tensor]


def uniform_soup(
    states: Sequence[State], task_lists: Sequence[Sequence[str]] | None = None
) -> dict[str, torch.Tensor]:
    """The element-wise float32 mean of `states` (summed in the given order, divided by their count)."""
    if not states:
        raise InputError("a soup needs at least one checkpoint", "select some checkpoints")
    if task_lists is not None and any(list(t) != list(task_lists[0]) for t in task_lists):
        raise InputError(
            f"the checkpoints have different outputs ({sorted({'+'.join(t) for t in task_lists})})",
            "soup checkpoints of one task set",
        )
    first = states[0]
    for i, s in enumerate(states[1:], 1):
        if s.keys() != first.keys() or any(s[k].shape != first[k].shape for k in first):
            raise InputError(
                f"checkpoint {i} of the soup is of another architecture than checkpoint 0",
                "soup checkpoints of one architecture and task set",
            )
    out = {}
    for k in first:
        acc = first[k].detach().float().clone()
        for s in states[1:]:
            acc += s[k].detach().float()
        out[k] = acc / len(states)
    return out


def greedy_soup(
    candidates: Mapping[str, State], score: Callable[[State], float]
) -> tuple[dict[str, torch.Tensor], list[str], list[dict[str, Any]]]:
    """Wortsman's greedy soup (see the module docstring): (soup state, kept ids best first, log)."""
    if not candidates:
        raise InputError("a soup needs at least one checkpoint", "select some checkpoints")
    own = {cid: _finite(score(state)) for cid, state in candidates.items()}
    order = sorted(candidates, key=lambda c: -own[c])  # stable: ties keep the given order
    chosen, best = [order[0]], own[order[0]]
    soup = uniform_soup([candidates[order[0]]])
    log = [{"ckpt_id": order[0], "score": own[order[0]], "soup_score": best, "kept": True}]
    for cid in order[1:]:
        trial = uniform_soup([candidates[c] for c in [*chosen, cid]])
        s = _finite(score(trial))
        kept = s >= best
        if kept:
            chosen.append(cid)
            soup, best = trial, s
        log.append({"ckpt_id": cid, "score": own[cid], "soup_score": s, "kept": kept})
    return soup, chosen, log


def _finite(x: float) -> float:
    return -math.inf if x is None or math.isnan(x) else float(x)


# ---- from a zoo ---------------------------------------------------------------------------------------
@dataclass
class Candidates:
    """The ingredients of a soup for (tasks, site): final checkpoints of fine-tunes of one base."""

    tasks: list[str]
    site: str
    base_id: str
    trainable: str | None  # the filter asked for (None: any subset)
    checkpoints: list[Any]  # CheckpointRecord, one per run
    runs: dict[str, Any]  # run_id -> RunRecord
    zoo_path: Path

    @property
    def dataset(self) -> str | None:
        return next(iter(self.runs.values())).dataset


def select_candidates(
    zoo: Any,
    tasks: Sequence[str],
    site: str,
    trainable: str | None = None,
    base_id: str | None = None,
) -> Candidates:
    """The soup's ingredients from `zoo` by the selection rule of the module docstring."""
    tasks = list(tasks)
    what = f"{'+'.join(tasks)} on site {site}"
    if not tasks or len(set(tasks)) != len(tasks):
        raise InputError(f"a soup needs distinct tasks, got {tasks}", "e.g. --task cord,gm,canal")
    if trainable is not None and trainable not in SUBSETS:
        raise UnknownNameError("trainable subset", trainable, SUBSETS)
    runs = [
        r
        for r in zoo.runs(site=site, status="done")
        if r.split in INGREDIENT_SPLITS and sorted(r.tasks) == sorted(tasks)
    ]
    if not runs:
        raise InputError(
            f"the zoo has no finished train/val runs of exactly {what}",
            "list its runs with `weightzoo zoo ls ZOO --runs`",
            zoo.path,
        )
    tuned = [r for r in runs if zoo.run_base(r.run_id) is not None]
    if not tuned:
        raise InputError(
            f"the {len(runs)} run(s) of {what} start from random inits: they lie in different basins of "
            "weight space, so their average is a broken network (Dice 0)",
            "build a fine-tune zoo (a grid with `from: BASE_MODEL_FOLDER`, docs/zoo.md) and soup its runs",
            zoo.path,
        )
    if trainable is not None:
        have = sorted({r.config.get("trainable", "all") for r in tuned})
        tuned = [r for r in tuned if r.config.get("trainable", "all") == trainable]
        if not tuned:
            raise InputError(
                f"no fine-tunes of {what} with trainable {trainable}",
                f"drop --trainable, or choose one of: {', '.join(have)}",
                zoo.path,
            )
    bases = sorted({zoo.run_base(r.run_id) for r in tuned})
    if base_id is not None:
        if base_id not in bases:
            raise UnknownNameError("base (of these fine-tunes)", base_id, bases, zoo.path)
        bases = [base_id]
    if len(bases) > 1:
        raise InputError(
            f"the fine-tunes of {what} come from {len(bases)} bases ({', '.join(bases)})",
            "soup the fine-tunes of one base: give --base ID",
            zoo.path,
        )
    tuned = [r for r in tuned if zoo.run_base(r.run_id) == bases[0]]
    finals = zoo.checkpoints(run_id=[r.run_id for r in tuned], kind="final")
    if not finals:
        raise InputError(f"the fine-tunes of {what} have no final checkpoints", "run `weightzoo zoo verify`")
    return Candidates(tasks, site, bases[0], trainable, finals, {r.run_id: r for r in tuned}, Path(zoo.path))


class ValScorer:
    """score(state) = mean pseudo Dice over `tasks` on the dataset's VALIDATION subjects of `site`."""

    def __init__(self, dataset: Any, spec: ArchSpec, tasks: Sequence[str], prep: Preprocessing, site: str):
        from weightzoo.generate.merge import val_slices

        self.spec, self.tasks = spec, list(tasks)
        self.val = val_slices(dataset, self.tasks, prep, [site])

    def dice(self, state: State) -> dict[str, float]:
        from weightzoo.generate.merge import pseudo_dice

        return pseudo_dice(load_real_state_dict(build_network(self.spec), dict(state)), self.val, self.tasks)

    def __call__(self, state: State) -> float:
        from weightzoo.generate.merge import mean_score

        return mean_score(self.dice(state).values())


@dataclass
class Soup:
    state: dict[str, torch.Tensor]
    spec: ArchSpec
    candidates: Candidates
    method: str
    chosen: list[str]  # checkpoint ids averaged
    prep: Preprocessing
    val_dice: dict[str, float] | None  # of the soup, on the site's validation subjects
    seconds: float
    log: list[dict[str, Any]] = field(default_factory=list)  # greedy: one entry per candidate
    dataset_path: Path | None = None


def make_soup(
    zoo: Any,
    tasks: Sequence[str],
    site: str,
    method: str = "uniform",
    trainable: str | None = None,
    dataset: Any | None = None,
    prep: Preprocessing | None = None,
    base_id: str | None = None,
) -> Soup:
    """A soup of the zoo's fine-tunes for (tasks, site). `dataset` (default: the zoo's, at its recorded
    path) gives the validation subjects: required by "greedy", used to report the soup's val Dice."""
    if method not in METHODS:
        raise UnknownNameError("soup method", method, METHODS)
    t0 = time.perf_counter()
    cands = select_candidates(zoo, tasks, site, trainable, base_id)
    if dataset is None:
        dataset = zoo.dataset_path(cands.dataset)
    if method == "greedy" and dataset is None:
        raise InputError(
            f"a greedy soup needs the validation subjects of site {site}, and the zoo's dataset "
            f"{cands.dataset} is not at its recorded path",
            "give --dataset DATASET_FOLDER",
            zoo.path,
        )
    spec = zoo.spec(cands.checkpoints[0].arch_hash)
    if prep is None:
        info = cands.runs[cands.checkpoints[0].run_id].info.get("preprocessing")
        prep = Preprocessing.from_dict(info or zoo.base(cands.base_id).preprocessing)
    states = {c.ckpt_id: restrict_to_tasks(zoo.load(c), c.tasks, cands.tasks) for c in cands.checkpoints}
    scorer = ValScorer(dataset, spec, cands.tasks, prep, site) if dataset is not None else None
    if method == "greedy":
        assert scorer is not None
        state, chosen, log = greedy_soup(states, scorer)
    else:
        state, chosen, log = uniform_soup(list(states.values())), list(states), []
    val_dice = scorer.dice(state) if scorer is not None else None
    ds_path = dataset.root if isinstance(dataset, RawDataset) else None if dataset is None else Path(dataset)
    return Soup(state, spec, cands, method, chosen, prep, val_dice, time.perf_counter() - t0, log, ds_path)


def save_soup(soup: Soup, out: str | Path, info: dict[str, Any] | None = None) -> Path:
    """Write the soup as a weightzoo model folder (route "soup")."""
    from weightzoo.segmenter import save_model

    c = soup.candidates
    net = load_real_state_dict(build_network(soup.spec), soup.state)
    meta = {
        "method": soup.method,
        "site": c.site,
        "base": c.base_id,
        "trainable": c.trainable or "any",
        "checkpoints": soup.chosen,
        "candidates": [r.ckpt_id for r in c.checkpoints],
        "selected_on": "val" if soup.method == "greedy" else None,
        "val_dice": None if soup.val_dice is None else {t: _num(v) for t, v in soup.val_dice.items()},
        "greedy_log": [
            {**e, "score": _num(e["score"]), "soup_score": _num(e["soup_score"])} for e in soup.log
        ],
        "zoo": str(c.zoo_path.resolve()),
        "dataset": c.dataset,
        **({"dataset_path": str(soup.dataset_path.resolve())} if soup.dataset_path else {}),
        **(info or {}),
    }
    return save_model(out, net, soup.spec, c.tasks, soup.prep, soup.seconds, route="soup", info=meta)


def _num(x: float) -> float | None:
    """JSON has no NaN or infinity: None instead."""
    return float(x) if math.isfinite(x) else None
