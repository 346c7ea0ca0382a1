"""The zoo grid: which runs to train, as a YAML/JSON mapping expanded into a fixed list of RunPlans.

    tasks: [cord, gm, [cord, gm]]   # each entry one run's tasks: a name, or a list (one multi-task run,
                                    # one sigmoid output channel per task, region-style); "cord+gm" too
    sites: each                     # each | all | [A, B, [A, B]]: one run per site, one run on all sites,
                                    # or listed entries (a list = one run on those sites together)
    seeds: [0, 1, 2]                # or an integer n: seeds 0..n-1
    preset: tiny                    # any key below may be a value or a list of values (a grid axis)
    optimizer: [sgd, adam]
    lr: null                        # null: the optimizer's default (1e-2 sgd, 1e-3 adam)
    weight_decay: 3.0e-5
    augment: [0.0, 1.0]             # augmentation strength in [0, 1]
    steps: 200                      # iterations; or `epochs` (passes over a run's training slices)
    batch_size: 8
    dropout: 0.0
    checkpoints: 20                 # random checkpoints per run, besides the initialisation and the final state
    from: base/                     # fine-tunes of one base network (a model folder): every run starts
                                    # from it (restricted to the run's tasks) and the zoo stores deltas
    trainable: [all, decoder, norm_seg]   # with `from`: what a fine-tune may change (a grid axis)
    # data (one value each): size, normalization, axis, foreground_oversample, grad_clip
    run_split: {train: 0.8, val: 0.1, test: 0.1}   # split of RUNS for learning on the zoo
    split_seed: 0

The expansion order is fixed (tasks, sites, preset, optimizer, lr, weight_decay, augment, steps/epochs,
batch_size, dropout, seeds innermost) and a run's id is a hash of its dataset and training config, so
the same grid always plans the same runs with the same ids. Unknown keys are errors.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from weightzoo.data.raw import RawDataset
from weightzoo.errors import InputError
from weightzoo.nets.unet import ArchSpec
from weightzoo.train.config import TrainConfig, load_config_file
from weightzoo.zoo.base import BaseNet, load_base

# grid key -> TrainConfig key, in expansion order (outer to inner; seeds are innermost)
AXES = (
    "preset",
    "trainable",
    "optimizer",
    "lr",
    "weight_decay",
    "augment",
    "steps",
    "epochs",
    "batch_size",
    "dropout",
)
DATA_KEYS = ("size", "normalization", "axis", "foreground_oversample", "grad_clip")
OTHER_KEYS = ("tasks", "sites", "seeds", "checkpoints", "run_split", "split_seed", "name", "from")
GRID_KEYS = (*OTHER_KEYS, *AXES, *DATA_KEYS)
DEFAULT_CHECKPOINTS = 20
DEFAULT_RUN_SPLIT = {"train": 0.8, "val": 0.1, "test": 0.1}
MAX_RUNS = 1_000_000  # runs one grid may plan (a typo like seeds: 100000000 must fail at once)
_CHECKPOINT_STREAM = 0x2A00  # stream id of the checkpoint-iteration draw (distinct from training streams)


@dataclass(frozen=True)
class RunPlan:
    """One planned run: its config, data (tasks, sites), checkpoint iterations and run split."""

    run_id: str
    dataset: str
    tasks: tuple[str, ...]  # output channel k = tasks[k]
    sites: tuple[str, ...]  # the run trains on these sites' training subjects
    config: TrainConfig
    checkpoint_steps: tuple[int, ...]  # the random ones, sorted, in [1, steps - 1]
    split: str  # train | val | test (split of runs)
    base: str | None = None  # id of the base network the run is fine-tuned from (None: random init)
    base_path: str | None = None  # its model folder

    @property
    def seed(self) -> int:
        return self.config.seed

    @property
    def steps(self) -> tuple[int, ...]:
        """All saved steps: 0 (initialisation), the random ones, and `config.steps` (final)."""
        return (0, *self.checkpoint_steps, self.config.steps)

    @property
    def n_planned(self) -> int:
        return len(self.steps)

    def kind(self, step: int) -> str:
        return "init" if step == 0 else "final" if step == self.config.steps else "random"

    def spec(self, input_channels: int) -> ArchSpec:
        c = self.config
        if self.base_path is not None:
            return cached_base(self.base_path).spec.with_classes(len(self.tasks))
        if c.dims == 3:  # planned for the patch and the spacing the build fixed (weightzoo.zoo.build)
            zyx = tuple(reversed(c.spacing)) if c.spacing else None
            return ArchSpec.preset(c.preset, input_channels, len(self.tasks), c.dropout, c.size[::-1], zyx)
        return ArchSpec.preset(c.preset, input_channels, len(self.tasks), c.dropout)

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "dataset": self.dataset,
            "tasks": list(self.tasks),
            "sites": list(self.sites),
            "config": self.config.to_dict(),
            "checkpoint_steps": list(self.checkpoint_steps),
            "split": self.split,
            "base": self.base,
            "base_path": self.base_path,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunPlan:
        return cls(
            d["run_id"],
            d["dataset"],
            tuple(d["tasks"]),
            tuple(d["sites"]),
            TrainConfig.from_dict(d["config"]),
            tuple(int(s) for s in d["checkpoint_steps"]),
            d["split"],
            d.get("base"),
            d.get("base_path"),
        )


@functools.lru_cache(maxsize=4)
def cached_base(path: str) -> BaseNet:
    """The base at `path`, loaded once per process (plans ask for its spec often)."""
    return load_base(path)


def checkpoint_steps(seed: int, steps: int, n: int) -> tuple[int, ...]:
    """G.pt-style: n distinct random iterations in [1, steps - 1], drawn from the run's seed alone."""
    pool = np.arange(1, steps)
    n = min(n, len(pool))
    rng = np.random.default_rng(np.random.SeedSequence([seed, _CHECKPOINT_STREAM]))
    return tuple(int(s) for s in np.sort(rng.choice(pool, size=n, replace=False)))


def _as_list(v: Any) -> list[Any]:
    return list(v) if isinstance(v, (list, tuple)) else [v]


def _names(entry: Any, what: str, source: Any) -> tuple[str, ...]:
    """A task/site entry: 'cord', 'cord+gm' or [cord, gm] -> ('cord', 'gm')."""
    if not isinstance(entry, (str, list, tuple)) or (
        isinstance(entry, (list, tuple)) and not all(isinstance(x, str) for x in entry)
    ):
        raise InputError(
            f"grid {what} entry {entry!r:.60} is not a name or a list of names",
            f"e.g. {what}: [a, [a, b]]",
            source,
        )
    items = entry if isinstance(entry, (list, tuple)) else entry.split("+")
    out = tuple(str(x).strip() for x in items if str(x).strip())
    if not out or len(set(out)) != len(out):
        raise InputError(
            f"grid {what} entry {entry!r} is empty or repeats a name", f"e.g. {what}: [a, [a, b]]", source
        )
    return out


class Grid:
    """A parsed grid (see the module docstring). `expand(ds)` gives the planned runs."""

    def __init__(self, d: dict[str, Any], source: str | Path | None = None):
        if not isinstance(d, dict):
            raise InputError("a zoo grid must be a mapping of key: value", "see docs/zoo.md", source)
        unknown = sorted(set(d) - set(GRID_KEYS))
        if unknown:
            raise InputError(f"unknown grid key(s) {unknown}", f"known keys: {', '.join(GRID_KEYS)}", source)
        if "tasks" not in d:
            raise InputError("the grid has no 'tasks'", "add tasks: [TASK, ...]", source)
        if "steps" in d and "epochs" in d:
            raise InputError("the grid gives both 'steps' and 'epochs'", "keep one of them", source)
        for k in DATA_KEYS:
            if k in d and isinstance(d[k], list) and k != "size":
                raise InputError(
                    f"'{k}' must be one value, not a list", "one zoo uses one preprocessing", source
                )
        from weightzoo.schemas import GRID_JSON, validate

        validate(d, GRID_JSON, source, "fix the grid (docs/zoo.md)")
        self.d, self.source = dict(d), source
        self.base: BaseNet | None = None
        if "from" in d:
            root = Path(source).parent if source is not None else Path(".")
            path = Path(str(d["from"]))
            self.base_path = str((path if path.is_absolute() or path.exists() else root / path).resolve())
            self.base = cached_base(self.base_path)
            for k in ("preset", "dropout", "size", "normalization", "axis"):
                if k in d:
                    raise InputError(
                        f"'{k}' is fixed by the base network (`from`)", f"remove '{k}' from the grid", source
                    )
        elif any(t != "all" for t in _as_list(d.get("trainable", "all"))):
            raise InputError(
                "'trainable' other than 'all' needs a base network", "add from: BASE_MODEL_FOLDER", source
            )
        self.task_entries = [_names(e, "tasks", source) for e in _as_list(d["tasks"])]
        seeds = d.get("seeds", 1)
        if isinstance(seeds, int) and not isinstance(seeds, bool):
            if seeds < 1:
                raise InputError(f"seeds: {seeds} must be >= 1", "seeds: N or seeds: [0, 1, ...]", source)
            if seeds > MAX_RUNS:  # checked before a list of that length is made
                raise InputError(
                    f"seeds: {seeds} is more than the {MAX_RUNS:,} runs a grid may plan",
                    "split the zoo into several grids",
                    source,
                )
            seeds = list(range(seeds))
        try:
            self.seeds = [int(s) for s in _as_list(seeds)]
            self.n_checkpoints = int(d.get("checkpoints", DEFAULT_CHECKPOINTS))
            self.split_seed = int(d.get("split_seed", 0))
        except (TypeError, ValueError) as e:
            raise InputError(
                f"grid value of the wrong type ({e})", "seeds and checkpoints are integers", source
            ) from None
        if len(set(self.seeds)) != len(self.seeds) or self.n_checkpoints < 0:
            raise InputError("seeds must be distinct and checkpoints >= 0", "fix the grid", source)
        split = d.get("run_split", DEFAULT_RUN_SPLIT)
        if not isinstance(split, dict) or set(split) - set(DEFAULT_RUN_SPLIT) or not split:
            raise InputError(
                "run_split must map train/val/test to fractions",
                "e.g. {train: 0.8, val: 0.1, test: 0.1}",
                source,
            )
        try:
            self.run_split = {k: float(split.get(k, 0.0)) for k in DEFAULT_RUN_SPLIT}
        except (TypeError, ValueError):
            raise InputError(
                "run_split fractions must be numbers", "e.g. {train: 0.8, val: 0.1, test: 0.1}", source
            ) from None
        if min(self.run_split.values()) < 0 or abs(sum(self.run_split.values()) - 1) > 1e-6:
            raise InputError(
                f"run_split {self.run_split} must be >= 0 and sum to 1", "fix the fractions", source
            )

    @classmethod
    def from_file(cls, path: str | Path) -> Grid:
        return cls(load_config_file(path), source=path)

    def _site_entries(self, ds: RawDataset) -> list[tuple[str, ...]]:
        sites = self.d.get("sites", "all")
        if sites == "all":
            return [tuple(ds.sites())]
        if sites == "each":
            return [(s,) for s in ds.sites()]
        entries = [_names(e, "sites", self.source) for e in _as_list(sites)]
        for e in entries:
            for s in e:
                if s not in ds.sites():
                    raise InputError(
                        f"site '{s}' is not a site of dataset {ds.name}",
                        f"choose from: {', '.join(ds.sites())}",
                        self.source,
                    )
        return entries

    def _n_train_slices(self, ds: RawDataset, sites: tuple[str, ...], axis: int) -> int:
        from weightzoo.data.io import read_image

        n = 0
        for case in ds.cases_in("train", sites):
            img = read_image(ds.image_files(case)[0])
            n += img.array.shape[axis + 1] if img.is_volume else 1
        return n

    def expand(self, ds: RawDataset) -> list[RunPlan]:
        """The planned runs on dataset `ds`, in a fixed order, with stable ids and a run split."""
        for e in self.task_entries:  # the grid names them: the error names the grid
            for t in e:
                if t not in ds.tasks:
                    raise InputError(
                        f"task '{t}' is not a task of dataset {ds.name}",
                        f"choose from: {', '.join(sorted(ds.tasks))}",
                        self.source,
                    )
        axes = [(k, _as_list(self.d[k])) for k in AXES if k in self.d]
        n_runs = math.prod([len(self.task_entries), len(self.seeds), *(len(v) for _, v in axes)])
        if n_runs > MAX_RUNS:  # the site entries only multiply this further
            raise InputError(
                f"the grid plans {n_runs:,} runs or more, above the cap of {MAX_RUNS:,}",
                "split the zoo into several grids",
                self.source,
            )
        data = {k: self.d[k] for k in DATA_KEYS if k in self.d}
        if self.base is not None:
            for e in self.task_entries:
                for t in e:
                    if t not in self.base.tasks:
                        raise InputError(
                            f"task '{t}' is not an output of the base (it has {list(self.base.tasks)})",
                            "fine-tune on the base's tasks",
                            self.source,
                        )
            prep = self.base.preprocessing
            data.update(size=list(prep["size"]), normalization=prep["normalization"], axis=int(prep["axis"]))
            data["preset"] = self.base.meta.get("info", {}).get("config", {}).get("preset", "small")
        if "size" in data and not isinstance(data["size"], list):
            data["size"] = [data["size"], data["size"]]
        plans: list[RunPlan] = []
        n_train_cache: dict[tuple[str, ...], int] = {}
        for tasks, sites in itertools.product(self.task_entries, self._site_entries(ds)):
            for values in itertools.product(*(v for _, v in axes)):
                hp = dict(zip([k for k, _ in axes], values, strict=True))
                if "epochs" in hp:
                    epochs = hp.pop("epochs")
                    if sites not in n_train_cache:
                        n_train_cache[sites] = self._n_train_slices(ds, sites, int(data.get("axis", 2)))
                    bs = int(hp.get("batch_size", TrainConfig.batch_size))
                    hp["steps"] = max(1, math.ceil(float(epochs) * n_train_cache[sites] / bs))
                for seed in self.seeds:
                    cfg = TrainConfig.from_dict(
                        {**data, **hp, "tasks": list(tasks), "seed": seed}, source=self.source
                    )
                    ident = {
                        **({"base": self.base.base_id} if self.base is not None else {}),
                        "dataset": ds.name,
                        "tasks": list(tasks),
                        "sites": list(sites),
                        "config": cfg.identity(),
                        "checkpoints": self.n_checkpoints,
                    }
                    run_id = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
                    steps = checkpoint_steps(seed, cfg.steps, self.n_checkpoints)
                    base = (self.base.base_id, self.base_path) if self.base is not None else (None, None)
                    plans.append(
                        RunPlan(run_id, ds.name, tuple(tasks), tuple(sites), cfg, steps, "train", *base)
                    )
        ids = [p.run_id for p in plans]
        if len(set(ids)) != len(ids):
            raise InputError(
                "the grid plans the same run twice (a value is repeated)", "remove the duplicate", self.source
            )
        return assign_run_split(plans, self.run_split, self.split_seed)


def assign_run_split(plans: list[RunPlan], fractions: dict[str, float], seed: int = 0) -> list[RunPlan]:
    """Split RUNS into train/val/test with exact counts: runs ranked by a hash of (seed, run id), the
    first round(f_test·n) go to test, the next round(f_val·n) to val, the rest to train."""
    n = len(plans)
    rank = sorted(plans, key=lambda p: hashlib.sha256(f"{seed}:{p.run_id}".encode()).hexdigest())
    n_test, n_val = round(fractions["test"] * n), round(fractions["val"] * n)
    split = {p.run_id: "test" for p in rank[:n_test]}
    split.update({p.run_id: "val" for p in rank[n_test : n_test + n_val]})
    return [dataclasses.replace(p, split=split.get(p.run_id, "train")) for p in plans]


def load_grid(path_or_dict: str | Path | dict[str, Any]) -> Grid:
    """A Grid from a .yaml/.yml/.json file or a dict."""
    return Grid(path_or_dict) if isinstance(path_or_dict, dict) else Grid.from_file(path_or_dict)
