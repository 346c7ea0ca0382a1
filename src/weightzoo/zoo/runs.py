"""One zoo run: its data, its batches, the evaluation at a saved checkpoint, and the sequential trainer.

The recipe is weightzoo.train's (nnU-Net 2-D): the same `sample_indices`, `augment_batch`,
`step_generator` streams, `poly_lr`, `make_optimizer` and `train_step`, in the same order as
`train_on_slices`, so a zoo run trained alone ends with the same weights as `weightzoo train` with
that config (tested). The batched trainer (weightzoo.zoo.batched) draws its batches with the same
`draw_batch` and scores checkpoints with the same `checkpoint_scores`.

At every saved step a checkpoint records: train_loss (Dice + BCE on a fixed subset of up to 64
training slices, no augmentation), val_loss (all tasks) and, per task, val_dice and val_loss on the
dataset's VALIDATION subjects of the run's sites. The test split is never loaded.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from weightzoo.data.raw import RawDataset
from weightzoo.data.slices import Preprocessing, SliceSet, load_slices
from weightzoo.errors import InputError
from weightzoo.nets.unet import real_state_dict
from weightzoo.train.augment import AugmentDraws, apply_augmentation, draw_augmentation
from weightzoo.train.loop import (
    STREAM_AUGMENT,
    STREAM_DATA,
    STREAM_TORCH,
    autocast_dtype,
    determinism,
    make_optimizer,
    poly_lr,
    sample_indices,
    step_generator,
    step_seed,
    train_step,
)
from weightzoo.train.losses import DiceBCELoss, dice_counts, dice_from_counts
from weightzoo.volume.patches import Patches, VolumeSet, augment_volumes
from weightzoo.zoo.base import start_network
from weightzoo.zoo.grid import RunPlan, cached_base
from weightzoo.zoo.store import PendingCheckpoint

TRAIN_EVAL_SLICES = 64  # slices of the fixed training subset the train loss is measured on
EVAL_BATCH = 64
Sink = Callable[[PendingCheckpoint], None]


class Phases:
    """Seconds spent per phase of a build: `with phases("draw"): ...` (benchmarks/zoo_build_profile.py).
    On CUDA each phase ends with a synchronize, so its kernels are counted where they were launched."""

    def __init__(self, device: torch.device | None = None):
        self.seconds: dict[str, float] = defaultdict(float)
        self.sync = device is not None and device.type == "cuda"

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t = time.perf_counter()
        yield
        if self.sync:
            torch.cuda.synchronize()
        self.seconds[name] += time.perf_counter() - t


def phase_timer(phases: Phases | None) -> Callable[[str], contextlib.AbstractContextManager[Any]]:
    """`phases`, or a context manager that times nothing."""
    return phases if phases is not None else contextlib.nullcontext


@dataclass
class ZooData:
    """The slices every planned run needs, loaded once: all train-split and val-split slices of the
    runs' sites, with one label channel per task of ANY run (`tasks`). Runs select rows and columns."""

    train: SliceSet | VolumeSet
    val: SliceSet | VolumeSet | None
    tasks: list[str]
    _cache: dict[tuple, RunData] = field(default_factory=dict, repr=False, compare=False)

    def run_data(self, plan: RunPlan, device: torch.device) -> RunData | VolumeRunData:
        """The run's RunData; runs with the same sites and tasks share one copy of the tensors."""
        if isinstance(self.train, VolumeSet):
            return VolumeRunData.make(plan, *self.for_run(plan), device)  # type: ignore[arg-type]
        key = (plan.sites, plan.tasks, str(device))
        if key not in self._cache:
            self._cache[key] = RunData.make(plan, *self.for_run(plan), device)
        shared = self._cache[key]
        return RunData(
            shared.train,
            shared.val,
            shared.x,
            shared.y,
            shared.fg_by_task,
            _eval_idx(plan, len(shared.train)),
        )

    def for_run(self, plan: RunPlan) -> tuple[Any, Any]:
        """The run's training and validation slices (or volumes), in `load_slices(ds, plan.tasks,
        cases=...)` order."""
        cols = [self.tasks.index(t) for t in plan.tasks]

        def pick(s: Any) -> Any:
            if s is None:
                return None
            if isinstance(s, VolumeSet):
                keep = [i for i, site in enumerate(s.case_sites) if site in plan.sites]
                return s.select(keep, cols) if keep else None
            idx = [i for i, m in enumerate(s.meta) if m["site"] in plan.sites]
            if not idx:
                return None
            out = s.select(idx)
            out.labels = np.ascontiguousarray(out.labels[:, cols])
            out.tasks = list(plan.tasks)
            return out

        train = pick(self.train)
        if train is None:
            raise InputError(
                f"run {plan.run_id} has no training slices on sites {list(plan.sites)}",
                "check the grid's sites",
            )
        return train, pick(self.val)


def load_zoo_data(ds: RawDataset, plans: Iterable[RunPlan], prep: Preprocessing) -> ZooData:
    """Load the train and val splits (never test) of the plans' sites, for the union of their tasks."""
    plans = list(plans)
    tasks: list[str] = []
    for p in plans:
        tasks += [t for t in p.tasks if t not in tasks]
    sites = sorted({s for p in plans for s in p.sites})
    train_cases = ds.cases_in("train", sites)
    if not train_cases:
        raise InputError(f"no training cases for sites {sites}", "check the dataset's splits", ds.root)
    val_cases = ds.cases_in("val", sites)
    if prep.dims == 3:  # whole preprocessed volumes; runs draw patches (weightzoo.volume)
        from weightzoo.volume.data import load_volumes

        vol = load_volumes(ds, tasks, train_cases, prep)
        return ZooData(vol, load_volumes(ds, tasks, val_cases, prep) if val_cases else None, tasks)
    train = load_slices(ds, tasks, prep=prep, cases=train_cases)
    val = load_slices(ds, tasks, prep=prep, cases=val_cases) if val_cases else None
    return ZooData(train, val, tasks)


@dataclass
class RunData:
    """A run's tensors on the training device."""

    train: SliceSet
    val: SliceSet | None
    x: torch.Tensor  # [N, C, H, W]
    y: torch.Tensor  # [N, K, H, W] uint8
    fg_by_task: list[torch.Tensor]
    eval_idx: np.ndarray  # rows of the fixed training subset for the train loss

    @classmethod
    def make(cls, plan: RunPlan, train: SliceSet, val: SliceSet | None, device: torch.device) -> RunData:
        return cls(
            train,
            val,
            torch.from_numpy(np.ascontiguousarray(train.images)).to(device),
            torch.from_numpy(np.ascontiguousarray(train.labels)).to(device),
            [
                torch.from_numpy(np.flatnonzero(train.labels[:, k].any(axis=(1, 2))))
                for k in range(train.labels.shape[1])
            ],
            _eval_idx(plan, len(train)),
        )

    @property
    def channels(self) -> int:
        return int(self.x.shape[1])


@dataclass
class VolumeRunData:
    """A 3-D run's data: its volumes (patches are drawn per step), a fixed subset of training patches
    for the train loss, and fixed validation patches (nnU-Net's pseudo Dice is on patches too)."""

    train: VolumeSet
    val: Patches | None
    train_eval: Patches
    patch: tuple[int, ...]  # [z, y, x]
    device: torch.device

    @classmethod
    def make(
        cls, plan: RunPlan, train: VolumeSet, val: VolumeSet | None, device: torch.device
    ) -> VolumeRunData:
        patch = tuple(reversed(plan.config.size))
        per_case = max(1, TRAIN_EVAL_SLICES // (8 * len(train)))  # a few patches per case, from the seed
        return cls(
            train,
            val.validation_patches(patch) if val is not None else None,
            train.validation_patches(patch, per_case=per_case, seed=plan.seed),
            patch,
            device,
        )

    @property
    def channels(self) -> int:
        return self.train.n_channels


def _eval_idx(plan: RunPlan, n: int) -> np.ndarray:
    """The run's fixed training subset for the train loss: up to 64 slices drawn from its seed."""
    rng = np.random.default_rng(plan.seed)
    return np.sort(rng.choice(n, size=min(n, TRAIN_EVAL_SLICES), replace=False))


def draw_batch(
    plan: RunPlan, data: RunData | VolumeRunData, step: int
) -> tuple[torch.Tensor, torch.Tensor, AugmentDraws | torch.Generator]:
    """The run's batch at `step` before augmentation, and its augmentation draws (as train_on_slices;
    for a 3-D run the augmentation's generator, as its draws are made while augmenting)."""
    cfg = plan.config
    if isinstance(data, VolumeRunData):
        x, y = data.train.sample(
            step_generator(cfg.seed, step, STREAM_DATA), cfg.batch_size, data.patch, cfg.foreground_oversample
        )
        return x.to(data.device), y.to(data.device), step_generator(cfg.seed, step, STREAM_AUGMENT)
    idx = sample_indices(
        step_generator(cfg.seed, step, STREAM_DATA),
        len(data.train),
        data.fg_by_task,
        cfg.batch_size,
        cfg.foreground_oversample,
    )
    dev_idx = idx.to(data.x.device)
    x, y = data.x[dev_idx], data.y[dev_idx]
    return (
        x,
        y,
        draw_augmentation(tuple(x.shape), cfg.augment, step_generator(cfg.seed, step, STREAM_AUGMENT)),
    )


def _loss_and_counts(
    logits: torch.Tensor, y: torch.Tensor, loss_fn: DiceBCELoss
) -> tuple[float, list[float], torch.Tensor, int]:
    """Over chunks of EVAL_BATCH slices (logits, y [N, K, H, W]): the slice-weighted sum of the chunk
    losses, of each task's chunk losses, the summed Dice counts [K, 3] and N."""
    k_tasks = logits.shape[1]
    total, per_task, counts = 0.0, [0.0] * k_tasks, torch.zeros(k_tasks, 3, dtype=torch.float64)
    for i in range(0, len(logits), EVAL_BATCH):
        lg, yy = logits[i : i + EVAL_BATCH].float(), y[i : i + EVAL_BATCH]
        total += float(loss_fn(lg, yy)) * len(lg)
        for k in range(k_tasks):
            per_task[k] += float(loss_fn(lg[:, k : k + 1], yy[:, k : k + 1])) * len(lg)
        counts += dice_counts(lg, yy)
    return total, per_task, counts, len(logits)


def checkpoint_scores(
    train_logits: torch.Tensor,
    train_y: torch.Tensor,
    val_logits: torch.Tensor | None,
    val_y: torch.Tensor | None,
    tasks: list[str],
    loss_fn: DiceBCELoss,
) -> dict[str, Any]:
    """train_loss, val_loss and per-task {val_dice, val_loss} from a checkpoint's logits on the run's
    fixed training subset and its validation slices ([N, K, H, W] each).

    Losses are means over slices of per-chunk losses (chunks of EVAL_BATCH, as evaluate_slices);
    Dice from tp/fp/fn summed over all validation slices (nnU-Net's pseudo Dice), NaN where a task has
    no foreground and none predicted."""
    total, _, _, n = _loss_and_counts(train_logits, train_y, loss_fn)
    out: dict[str, Any] = {"train_loss": total / n, "val_loss": None, "metrics": {t: {} for t in tasks}}
    if val_logits is not None and val_y is not None and len(val_logits):
        total, per_task, counts, n = _loss_and_counts(val_logits, val_y, loss_fn)
        out["val_loss"] = total / n
        for t, d, lv in zip(tasks, dice_from_counts(counts), per_task, strict=True):
            out["metrics"][t] = {"val_dice": d, "val_loss": lv / n}
    return out


def augment_drawn(
    x: torch.Tensor, y: torch.Tensor, draws: AugmentDraws | torch.Generator, strength: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply what `draw_batch` drew: 2-D draws, or 3-D augmentation from its generator."""
    if isinstance(draws, torch.Generator):
        return augment_volumes(x, y, strength, draws)
    return apply_augmentation(x, y, draws)


def eval_inputs(
    data: RunData | VolumeRunData,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(x, y) of the run's fixed training subset and (x, y) of its validation slices (None if none)."""
    if isinstance(data, VolumeRunData):
        tx, ty = (
            torch.as_tensor(a).to(data.device) for a in (data.train_eval.images, data.train_eval.labels)
        )
        if data.val is None:
            return tx, ty, None, None
        return (
            tx,
            ty,
            torch.as_tensor(data.val.images).to(data.device),
            torch.as_tensor(data.val.labels).to(data.device),
        )
    device = data.x.device
    idx = torch.from_numpy(data.eval_idx).to(device)
    if data.val is None or not len(data.val):
        return data.x[idx], data.y[idx], None, None
    return (
        data.x[idx],
        data.y[idx],
        torch.as_tensor(data.val.images).to(device),
        torch.as_tensor(data.val.labels).to(device),
    )


@torch.no_grad()
def evaluate_checkpoint(
    forward: Callable[[torch.Tensor], torch.Tensor],
    data: RunData | VolumeRunData,
    tasks: list[str],
    loss_fn: DiceBCELoss,
    amp_dtype: torch.dtype | None = None,
) -> dict[str, Any]:
    """`checkpoint_scores` of the weights `forward` computes with (x [N, C, H, W] -> logits)."""
    device = data.device if isinstance(data, VolumeRunData) else data.x.device

    def logits(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            return torch.cat([forward(x[i : i + EVAL_BATCH]) for i in range(0, len(x), EVAL_BATCH)])

    tx, ty, vx, vy = eval_inputs(data)
    return checkpoint_scores(logits(tx), ty, None if vx is None else logits(vx), vy, tasks, loss_fn)


def pending(
    plan: RunPlan, step: int, state: dict[str, torch.Tensor], ev: dict[str, Any], seconds: float, mode: str
) -> PendingCheckpoint:
    """A PendingCheckpoint for `plan` at `step` (weights copied to the CPU)."""
    return PendingCheckpoint(
        run_id=plan.run_id,
        step=step,
        kind=plan.kind(step),
        state={k: v.detach().to("cpu", copy=True) for k, v in state.items()},
        train_loss=ev["train_loss"],
        val_loss=ev["val_loss"],
        lr=poly_lr(plan.config.learning_rate, step, plan.config.steps),
        metrics=ev["metrics"],
        info={"seconds": round(seconds, 3), "mode": mode},
    )


def train_sequential(
    plan: RunPlan,
    data: RunData | VolumeRunData,
    device: torch.device,
    sink: Sink,
    skip: Iterable[int] = (),
    on_step: Callable[[int], None] | None = None,
    phases: Phases | None = None,
) -> None:
    """Train one run alone (torch.optim, nn.Module) and hand every planned checkpoint not in `skip`
    to `sink`. Stops as soon as the last checkpoint still to save is saved. `phases` times the parts."""
    phase = phase_timer(phases)
    cfg = plan.config
    save = sorted(set(plan.steps) - {int(s) for s in skip})
    if not save:
        return
    t0 = time.perf_counter()
    spec = plan.spec(data.channels)
    with determinism(device, cfg.deterministic):
        base = cached_base(plan.base_path) if plan.base_path else None
        net = start_network(spec, cfg.seed, base, plan.tasks, cfg.trainable).to(device)
        if cfg.channels_last:
            net = net.to(memory_format=torch.channels_last)
        optimizer = make_optimizer(net, cfg)
        net.train()
        loss_fn = DiceBCELoss()
        amp = autocast_dtype(cfg, device)

        def save_now(step: int) -> None:
            with phase("evaluate"):
                net.eval()
                ev = evaluate_checkpoint(net, data, list(plan.tasks), loss_fn, amp)
                net.train()
            with phase("commit"):
                sink(pending(plan, step, real_state_dict(net), ev, time.perf_counter() - t0, "sequential"))

        if save[0] == 0:
            save_now(0)
        for step in range(save[-1]):
            lr = poly_lr(cfg.learning_rate, step, cfg.steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with phase("draw"):
                x, y, draws = draw_batch(plan, data, step)
            with phase("augment"):
                xb, yb = augment_drawn(x, y, draws, cfg.augment)
                if cfg.channels_last:
                    xb = xb.contiguous(memory_format=torch.channels_last)
            torch.manual_seed(step_seed(cfg.seed, step, STREAM_TORCH))  # dropout, as train_on_slices
            with phase("forward, backward, update"):
                train_step(net, optimizer, loss_fn, xb, yb, amp, cfg.grad_clip)
            if on_step is not None:
                on_step(1)
            if step + 1 in save:
                save_now(step + 1)
