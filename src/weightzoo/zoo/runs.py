"""One zoo run: its data, its batches, the evaluation at a saved checkpoint, and the sequential trainer.

The recipe is weightzoo.train's (nnU-Net 2-D): the same `sample_indices`, `augment_batch`,
`step_generator` streams, `poly_lr`, `make_optimizer` and `train_step`, in the same order as
`train_on_slices`, so a zoo run trained alone ends with the same weights as `weightzoo train` with
that config (tested). The batched trainer (weightzoo.zoo.batched) draws its batches with the same
`make_batch` and evaluates with the same `evaluate_checkpoint`.

At every saved step a checkpoint records: train_loss (Dice + BCE on a fixed subset of up to 64
training slices, no augmentation), val_loss (all tasks) and, per task, val_dice and val_loss on the
dataset's VALIDATION subjects of the run's sites. The test split is never loaded.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
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
from weightzoo.zoo.base import start_network
from weightzoo.zoo.grid import RunPlan, cached_base
from weightzoo.zoo.store import PendingCheckpoint

TRAIN_EVAL_SLICES = 64  # slices of the fixed training subset the train loss is measured on
EVAL_BATCH = 64
Sink = Callable[[PendingCheckpoint], None]


@dataclass
class ZooData:
    """The slices every planned run needs, loaded once: all train-split and val-split slices of the
    runs' sites, with one label channel per task of ANY run (`tasks`). Runs select rows and columns."""

    train: SliceSet
    val: SliceSet | None
    tasks: list[str]
    _cache: dict[tuple, RunData] = field(default_factory=dict, repr=False, compare=False)

    def run_data(self, plan: RunPlan, device: torch.device) -> RunData:
        """The run's RunData; runs with the same sites and tasks share one copy of the tensors."""
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

    def for_run(self, plan: RunPlan) -> tuple[SliceSet, SliceSet | None]:
        """The run's training and validation slices, in `load_slices(ds, plan.tasks, cases=...)` order."""
        cols = [self.tasks.index(t) for t in plan.tasks]

        def pick(s: SliceSet | None) -> SliceSet | None:
            if s is None:
                return None
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


def _eval_idx(plan: RunPlan, n: int) -> np.ndarray:
    """The run's fixed training subset for the train loss: up to 64 slices drawn from its seed."""
    rng = np.random.default_rng(plan.seed)
    return np.sort(rng.choice(n, size=min(n, TRAIN_EVAL_SLICES), replace=False))


def draw_batch(plan: RunPlan, data: RunData, step: int) -> tuple[torch.Tensor, torch.Tensor, AugmentDraws]:
    """The run's batch at `step` before augmentation, and its augmentation draws (as train_on_slices)."""
    cfg = plan.config
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


def make_batch(plan: RunPlan, data: RunData, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The run's augmented batch at `step`: x [B, C, H, W], y [B, K, H, W] — as train_on_slices draws it."""
    cfg = plan.config
    x, y, draws = draw_batch(plan, data, step)
    xb, yb = apply_augmentation(x, y, draws)
    if cfg.channels_last:
        xb = xb.contiguous(memory_format=torch.channels_last)
    return xb, yb


@torch.no_grad()
def evaluate_checkpoint(
    forward: Callable[[torch.Tensor], torch.Tensor],
    data: RunData,
    tasks: list[str],
    loss_fn: DiceBCELoss,
    amp_dtype: torch.dtype | None = None,
) -> dict[str, Any]:
    """train_loss, val_loss and per-task {val_dice, val_loss} of the weights `forward` computes with.

    Losses are means over slices of per-batch losses (as evaluate_slices); Dice from tp/fp/fn summed
    over all validation slices (nnU-Net's pseudo Dice), NaN where a task has no foreground and none predicted.
    """
    device = data.x.device

    def run(
        images: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor
    ) -> tuple[float, list[float], torch.Tensor]:
        total, per_task, n, counts = (
            0.0,
            [0.0] * len(tasks),
            0,
            torch.zeros(len(tasks), 3, dtype=torch.float64),
        )
        for i in range(0, len(images), EVAL_BATCH):
            x = torch.as_tensor(images[i : i + EVAL_BATCH]).to(device)
            y = torch.as_tensor(labels[i : i + EVAL_BATCH]).to(device)
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                logits = forward(x)
            total += float(loss_fn(logits, y)) * len(x)
            for k in range(len(tasks)):
                per_task[k] += float(loss_fn(logits[:, k : k + 1], y[:, k : k + 1])) * len(x)
            counts += dice_counts(logits, y)
            n += len(x)
        return total / n, [v / n for v in per_task], counts

    idx = torch.from_numpy(data.eval_idx).to(device)
    train_loss, _, _ = run(data.x[idx], data.y[idx])
    out: dict[str, Any] = {"train_loss": train_loss, "val_loss": None, "metrics": {t: {} for t in tasks}}
    if data.val is not None and len(data.val):
        val_loss, per_task, counts = run(data.val.images, data.val.labels)
        out["val_loss"] = val_loss
        for t, d, lv in zip(tasks, dice_from_counts(counts), per_task, strict=True):
            out["metrics"][t] = {"val_dice": d, "val_loss": lv}
    return out


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
    data: RunData,
    device: torch.device,
    sink: Sink,
    skip: Iterable[int] = (),
    on_step: Callable[[int], None] | None = None,
) -> None:
    """Train one run alone (torch.optim, nn.Module) and hand every planned checkpoint not in `skip`
    to `sink`. Stops as soon as the last checkpoint still to save is saved."""
    import time

    cfg = plan.config
    save = sorted(set(plan.steps) - {int(s) for s in skip})
    if not save:
        return
    t0 = time.perf_counter()
    spec = plan.spec(data.x.shape[1])
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
            net.eval()
            ev = evaluate_checkpoint(net, data, list(plan.tasks), loss_fn, amp)
            net.train()
            sink(pending(plan, step, real_state_dict(net), ev, time.perf_counter() - t0, "sequential"))

        if save[0] == 0:
            save_now(0)
        for step in range(save[-1]):
            lr = poly_lr(cfg.learning_rate, step, cfg.steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            xb, yb = make_batch(plan, data, step)
            torch.manual_seed(step_seed(cfg.seed, step, STREAM_TORCH))  # dropout, as train_on_slices
            train_step(net, optimizer, loss_fn, xb, yb, amp, cfg.grad_clip)
            if on_step is not None:
                on_step(1)
            if step + 1 in save:
                save_now(step + 1)
