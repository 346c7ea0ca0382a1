"""Build a zoo: expand the grid, register the runs, train what is missing, commit checkpoints atomically.

Resumable at any moment: runs already `done` in the manifest are skipped; a run that was killed part
way is trained again from its seed (training is deterministic, so on the CPU it reproduces its
committed checkpoints bit for bit) and only its checkpoints not yet in the manifest are committed. The
store's protocol (files first, then rows in one transaction, orphans deleted on open) means a kill
never leaves a duplicate, partial or orphan entry. A run's final checkpoint and its `done` mark are
committed in the same transaction.

Checkpoints of a run are buffered and committed together (one shard file) when the run ends, or
earlier when the buffers of all runs exceed `max_buffer_mb`.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from weightzoo.data.raw import RawDataset
from weightzoo.data.slices import Preprocessing
from weightzoo.errors import InputError, ModelError
from weightzoo.segmenter import resolve_device
from weightzoo.train.config import TrainConfig
from weightzoo.train.loop import progress_bar
from weightzoo.zoo.batched import batchable, choose_mode, group_key, train_batched
from weightzoo.zoo.grid import Grid, RunPlan, cached_base, load_grid
from weightzoo.zoo.runs import RunData, load_zoo_data, train_sequential
from weightzoo.zoo.store import PendingCheckpoint, Zoo

EXECUTORS = ("local", "ray")


@dataclass
class BuildResult:
    zoo: Path
    runs_planned: int
    checkpoints_planned: int
    runs_trained: int  # runs trained (fully or the missing part) by this call
    runs_skipped: int  # runs already done before this call
    checkpoints_committed: int  # by this call
    seconds: float
    modes: dict[str, int] = field(default_factory=dict)  # mode -> runs trained that way
    device: str = "cpu"


class CheckpointWriter:
    """Buffers checkpoints per run; commits a run's buffer when its final checkpoint arrives (marking
    it done in the same transaction) or all buffers when they exceed `max_bytes`."""

    def __init__(
        self,
        zoo: Zoo,
        plans: dict[str, RunPlan],
        max_bytes: int,
        on_commit: Callable[[int], None] | None = None,
    ):
        self.zoo, self.plans, self.max_bytes, self.on_commit = zoo, plans, max_bytes, on_commit
        self.buffers: dict[str, list[PendingCheckpoint]] = {}
        self.nbytes = 0
        self.committed = 0

    def __call__(self, ck: PendingCheckpoint) -> None:
        if not all(bool(torch.isfinite(v).all()) for v in ck.state.values()):
            self.flush()  # what the other runs reached is kept: the rebuild resumes from it
            raise ModelError(
                f"zoo run {ck.run_id} diverged at step {ck.step} (non-finite weights); nothing of this "
                "checkpoint was stored, the run's earlier checkpoints were kept",
                "lower the grid's lr (or check the data), then build again",
            )
        self.buffers.setdefault(ck.run_id, []).append(ck)
        self.nbytes += sum(v.numel() * v.element_size() for v in ck.state.values())
        if ck.step == self.plans[ck.run_id].config.steps:
            self._flush(ck.run_id, done=True)
        elif self.nbytes > self.max_bytes or not self.zoo.shard:
            for rid in list(self.buffers):
                self._flush(rid, done=False)

    def _flush(self, run_id: str, done: bool) -> None:
        items = self.buffers.pop(run_id, [])
        self.nbytes -= sum(v.numel() * v.element_size() for ck in items for v in ck.state.values())
        new = self.zoo.commit(items, done_runs=[run_id] if done else [])
        self.committed += len(new)
        if self.on_commit is not None:
            self.on_commit(len(items))

    def flush(self) -> None:
        for rid in list(self.buffers):
            self._flush(rid, done=False)


def data_preprocessing(ds: RawDataset, plans: list[RunPlan]) -> tuple[list[RunPlan], Preprocessing]:
    """The zoo's one Preprocessing; for 3-D grids nnU-Net's pipeline, planned once for all runs: the
    target spacing (the median over the train cases of all the grid's sites, unless the grid gives one)
    is written into every run's config, so every run plans the same ArchSpec."""
    c0 = plans[0].config
    if c0.dims != 3:
        return plans, Preprocessing(c0.normalization, tuple(c0.size), c0.axis, ds.n_channels)
    from weightzoo.volume.data import volume_preprocessing

    if len({(p.config.preset, p.config.size, p.config.spacing, p.config.normalization) for p in plans}) > 1:
        raise InputError(
            "a 3-D grid varies the preset, patch size, spacing or normalization",
            "build one zoo per 3-D architecture (its preprocessing is planned once)",
        )
    sites = sorted({s for p in plans for s in p.sites})
    prep = volume_preprocessing(ds, c0, ds.cases_in("train", sites))
    spacing = list(reversed(prep.pipeline["spacing"]))  # type: ignore[index]  # voxel order, as configs
    fixed = [
        dataclasses.replace(p, config=TrainConfig.from_dict({**p.config.to_dict(), "spacing": spacing}))
        for p in plans
    ]
    return fixed, prep


def register_plans(zoo: Zoo, ds: RawDataset, plans: list[RunPlan], prep: Preprocessing) -> None:
    """Record the dataset and every planned run (idempotent)."""
    zoo.add_dataset(
        ds.name,
        ds.meta,
        {"path": str(ds.root), "preprocessing": prep.to_dict(), "val_subjects": ds.splits()["val"]},
    )
    for p in plans:
        if p.base_path is not None:
            zoo.add_base(cached_base(p.base_path))
        zoo.add_run(
            p.run_id,
            p.spec(ds.n_channels),
            p.tasks,
            p.sites,
            p.split,
            p.n_planned,
            config={**p.config.identity(), "checkpoint_steps": list(p.steps)},
            seed=p.seed,
            dataset=ds.name,
            source="build",
            info={"preprocessing": prep.to_dict(), **({"base": p.base} if p.base else {})},
        )


def plan_groups(plans: list[RunPlan], input_channels: int, parallel: int | None) -> list[list[RunPlan]]:
    """Runs that can train in one batch, in plan order, chunks of at most `parallel`; dropout runs alone."""
    groups: dict[tuple, list[RunPlan]] = {}
    singles = []
    for p in plans:
        if batchable(p):
            groups.setdefault(group_key(p, input_channels), []).append(p)
        else:
            singles.append([p])
    size = max(1, parallel or 1_000_000)
    out = [g[i : i + size] for g in groups.values() for i in range(0, len(g), size)]
    return out + singles


def schedule(
    todo: list[RunPlan], recorded: dict[str, str], input_channels: int, parallel: int, mode: str
) -> list[tuple[list[RunPlan], str]]:
    """(group, mode) pairs to train. A run with committed checkpoints keeps the mode they were made
    with (`recorded`), so its restarted trajectory matches them: bit for bit when sequential on the
    CPU, to float rounding when batched (another batch composition)."""
    seq = [p for p in todo if recorded.get(p.run_id) == "sequential"]
    rest = [p for p in todo if recorded.get(p.run_id) != "sequential"]
    out = [([p], "sequential") for p in seq]
    for g in plan_groups(rest, input_channels, parallel):
        forced = any(recorded.get(p.run_id) == "batched" for p in g) and len(g) > 1
        out.append((g, "batched" if forced else mode))
    return out


def default_parallel(device: torch.device) -> int:
    """Runs per batch when --parallel is not given: 64 on a GPU, 8 on the CPU."""
    return 64 if device.type == "cuda" else 8


def train_group(
    group: list[RunPlan],
    datas: list[RunData],
    device: torch.device,
    sink: Callable[[PendingCheckpoint], None],
    skips: list[set[int]],
    mode: str,
    on_step: Callable[[int], None] | None = None,
    log: Callable[[str], None] | None = None,
) -> str:
    """Train one group batched or sequentially (mode auto|batched|sequential); returns the mode used."""
    spec = group[0].spec(datas[0].channels)
    cfg = group[0].config
    chosen = (
        choose_mode(spec, cfg.batch_size, cfg.size, len(group), device, mode, log, cfg.steps)
        if batchable(group[0])
        else "sequential"
    )
    if chosen == "batched":
        train_batched(group, datas, device, sink, skips, on_step)
    else:
        for p, d, s in zip(group, datas, skips, strict=True):
            train_sequential(p, d, device, sink, s, on_step)
    return chosen


def build_zoo(
    dataset: str | Path | RawDataset,
    grid: str | Path | dict[str, Any] | Grid,
    zoo_path: str | Path,
    device: str = "auto",
    parallel: int | None = None,
    executor: str = "local",
    address: str | None = None,
    mode: str = "auto",
    dtype: str | None = None,
    shard: bool | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    max_buffer_mb: float = 512,
) -> BuildResult:
    """Build (or finish building) the zoo at `zoo_path` from `grid` on `dataset`. See the module doc.

    device: auto | cpu | cuda[:i]; parallel: runs per batch (default 64 on CUDA, 8 on CPU);
    mode: auto | batched | sequential; executor: local | ray (with `address` of a Ray cluster).
    dtype (float32 | float16) and shard: for a new zoo (default float32, sharded); an existing zoo keeps its own.
    """
    t0 = time.perf_counter()
    if executor not in EXECUTORS:
        from weightzoo.errors import UnknownNameError

        raise UnknownNameError("executor", executor, EXECUTORS)
    if mode not in ("auto", "batched", "sequential"):  # before the zoo is created or a run registered
        from weightzoo.errors import UnknownNameError

        raise UnknownNameError("training mode", mode, ["auto", "batched", "sequential"])
    ds = dataset if isinstance(dataset, RawDataset) else RawDataset.open(dataset)
    g = grid if isinstance(grid, Grid) else load_grid(grid)
    plans = g.expand(ds)
    if not plans:
        raise InputError("the grid plans no runs", "give tasks, sites and seeds", g.source)
    plans, prep = data_preprocessing(ds, plans)
    dev = resolve_device(device)
    with Zoo(zoo_path, create=True, writable=True, dtype=dtype, shard=shard) as zoo:
        register_plans(zoo, ds, plans, prep)
        done = {r.run_id for r in zoo.runs(status="done")}
        todo = [p for p in plans if p.run_id not in done]
        skips = {p.run_id: zoo.committed_steps(p.run_id) for p in todo}
        recorded = {
            p.run_id: str(c[0].info.get("mode"))
            for p in todo
            if skips[p.run_id] and (c := zoo.checkpoints(run_id=p.run_id, limit=1))
        }
        n_ckpt = sum(p.n_planned for p in plans)
        log(
            f"zoo {zoo.path}: {len(plans)} runs ({n_ckpt} checkpoints) planned on {ds.name}; "
            f"{len(done)} done, {len(todo)} to train on {dev}"
        )
        prog, bar = progress_bar(
            "[bold]zoo[/] checkpoints",
            progress,
            n_ckpt,
            n_ckpt - sum(p.n_planned - len(skips[p.run_id]) for p in todo),
        )
        writer = CheckpointWriter(
            zoo,
            {p.run_id: p for p in plans},
            int(max_buffer_mb * 2**20),
            lambda n: prog.update(bar, advance=n),
        )
        modes: dict[str, int] = {}
        with prog:
            if todo and executor == "ray":
                from weightzoo.zoo.executors import run_ray

                work = schedule(todo, recorded, ds.n_channels, parallel or 1, mode)
                modes = run_ray(work, ds, prep, device, address, skips, writer, log)
            elif todo:
                data = load_zoo_data(ds, todo, prep)
                for group, group_mode in schedule(
                    todo, recorded, ds.n_channels, parallel or default_parallel(dev), mode
                ):
                    datas = [data.run_data(p, dev) for p in group]
                    used = train_group(
                        group, datas, dev, writer, [skips[p.run_id] for p in group], group_mode, log=log
                    )
                    modes[used] = modes.get(used, 0) + len(group)
            writer.flush()
        left = [r.run_id for r in zoo.runs(status="planned") if r.run_id in {p.run_id for p in plans}]
        if left:
            raise InputError(
                f"{len(left)} run(s) did not finish (e.g. {left[0]})",
                "run the same build again to finish them",
            )
        return BuildResult(
            zoo=zoo.path,
            runs_planned=len(plans),
            checkpoints_planned=n_ckpt,
            runs_trained=len(todo),
            runs_skipped=len(done),
            checkpoints_committed=writer.committed,
            seconds=time.perf_counter() - t0,
            modes=modes,
            device=str(dev),
        )
