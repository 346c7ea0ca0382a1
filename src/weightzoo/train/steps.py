"""The pieces of one training step and its bookkeeping, shared by every route's loop and the benchmarks.

Seeds per (seed, step, stream), nnU-Net's poly schedule and optimizers, one optimizer step with
gradient clipping, nnU-Net's foreground-oversampled batch indices, validation by pseudo Dice,
history <-> strict JSON, determinism and the progress bar. `weightzoo.train.loop` runs them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from weightzoo.data.slices import SliceSet
from weightzoo.errors import ModelError
from weightzoo.train.config import TrainConfig
from weightzoo.train.losses import DiceBCELoss, dice_counts, dice_from_counts


def step_seed(seed: int, step: int, stream: int) -> int:
    """A 64-bit seed from (seed, step, stream) alone: what makes resuming exact."""
    return int(np.random.SeedSequence([seed, step, stream]).generate_state(1, np.uint64)[0])


def step_generator(seed: int, step: int, stream: int) -> torch.Generator:
    """A CPU generator seeded by `step_seed`."""
    return torch.Generator().manual_seed(step_seed(seed, step, stream))


def poly_lr(lr: float, step: int, steps: int, exponent: float = 0.9) -> float:
    """nnU-Net's poly schedule, per iteration."""
    return lr * (1 - step / steps) ** exponent


def make_optimizer(net: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            net.parameters(), cfg.learning_rate, momentum=0.99, nesterov=True, weight_decay=cfg.weight_decay
        )
    return torch.optim.Adam(net.parameters(), cfg.learning_rate, weight_decay=cfg.weight_decay)


def autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    return torch.bfloat16 if cfg.amp and device.type == "cuda" else None


def train_step(
    net: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: DiceBCELoss,
    x: torch.Tensor,
    y: torch.Tensor,
    amp_dtype: torch.dtype | None = None,
    grad_clip: float = 12.0,
) -> torch.Tensor:
    """One forward + backward + optimizer step on x [B, C, H, W], y [B, K, H, W]; returns the loss."""
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(
        device_type=x.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None
    ):
        logits = net(x)
    loss = loss_fn(logits, y)  # fp32
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(net.parameters(), grad_clip)
    optimizer.step()
    return loss.detach()


def sample_indices(
    generator: torch.Generator, n: int, fg_by_task: list[torch.Tensor], batch_size: int, oversample: float
) -> torch.Tensor:
    """Batch indices into n slices: the last round(B·oversample) (as nnU-Net) from slices with
    foreground of a uniformly chosen task (among tasks with any), the rest uniform; with replacement."""
    n_fg = batch_size - round(batch_size * (1 - oversample))
    pools = [p for p in fg_by_task if len(p)]
    rand = torch.randint(n, (batch_size,), generator=generator)
    pick_task = torch.randint(max(len(pools), 1), (n_fg,), generator=generator)
    u = torch.rand(n_fg, generator=generator)
    if not pools or n_fg == 0:
        return rand
    fg = torch.stack(
        [pools[int(t)][int(float(v) * len(pools[int(t)]))] for t, v in zip(pick_task, u, strict=True)]
    )
    return torch.cat([rand[: batch_size - n_fg], fg])


def format_dice(dice: dict[str, float | None]) -> str:
    """'cord 0.951, gm n/a' for a history entry's val_dice (NaN/None: no foreground in val)."""
    return ", ".join(f"{t} {'n/a' if d is None or math.isnan(d) else f'{d:.3f}'}" for t, d in dice.items())


def history_to_json(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """History entries with an undefined (NaN) val Dice written as null: strict JSON."""
    return [
        {**e, "val_dice": {t: None if math.isnan(d) else d for t, d in e["val_dice"].items()}}
        if "val_dice" in e
        else dict(e)
        for e in history
    ]


def history_from_json(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Inverse of `history_to_json`: null val Dice back to NaN (as weightzoo.evaluate reports it)."""
    return [
        {**e, "val_dice": {t: math.nan if d is None else d for t, d in e["val_dice"].items()}}
        if "val_dice" in e
        else dict(e)
        for e in history
    ]


def slices_hash(s: SliceSet) -> str:
    """Fingerprint of training data (images, labels, tasks): a checkpoint never resumes on other data."""
    h = hashlib.sha256()
    h.update(json.dumps([s.tasks, list(s.images.shape), list(s.labels.shape)]).encode())
    h.update(np.ascontiguousarray(s.images, dtype=np.float32).tobytes())
    h.update(np.ascontiguousarray(s.labels, dtype=np.uint8).tobytes())
    return h.hexdigest()[:16]


@torch.no_grad()
def evaluate_slices(
    net: torch.nn.Module,
    val: SliceSet,
    loss_fn: DiceBCELoss,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    batch_size: int = 64,
    channels_last: bool = False,
) -> tuple[float, list[float]]:
    """Mean loss and Dice per task (counts summed over all slices, as nnU-Net's pseudo Dice)."""
    was_training = net.training
    net.eval()
    total, n, counts = 0.0, 0, None
    for i in range(0, len(val), batch_size):
        x = torch.from_numpy(val.images[i : i + batch_size]).to(device)
        y = torch.from_numpy(val.labels[i : i + batch_size]).to(device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(
            device_type=device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None
        ):
            logits = net(x)
        total += float(loss_fn(logits, y)) * len(x)
        n += len(x)
        c = dice_counts(logits, y)
        counts = c if counts is None else counts + c
    net.train(was_training)
    assert counts is not None
    return total / max(n, 1), dice_from_counts(counts)


def weights_finite(net: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in net.parameters())


def diverged(step: int, loss: float, out_dir: Path) -> ModelError:
    """Training produced NaN/inf: stop without writing a model or a checkpoint of the broken weights
    (the last good checkpoint, if any, stays in out_dir)."""
    what = f"loss {loss}" if not math.isfinite(loss) else "weights with NaN/inf"
    return ModelError(
        f"training diverged at step {step} ({what}); no model was written",
        "lower --lr (or check the images for extreme values), then train again with --force",
        out_dir,
    )


@contextlib.contextmanager
def determinism(device: torch.device, enabled: bool) -> Iterator[None]:
    """Deterministic kernels for the run only; the process's settings are restored afterwards.

    CPU: torch.use_deterministic_algorithms (free there). CUDA: deterministic cuDNN convolutions;
    the global switch is left off, as on CUDA it needs CUBLAS_WORKSPACE_CONFIG set before start-up.
    """
    old = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    old_algos, old_warn = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    if enabled and device.type == "cuda":
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    elif enabled:
        torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = old
        torch.use_deterministic_algorithms(old_algos, warn_only=old_warn)


def progress_bar(label: str, enabled: bool, total: int, start: int = 0) -> Any:
    """A rich progress bar (label, bar, n/total, times, a free `status` field) and its task id."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    prog = Progress(
        TextColumn(label),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[status]}"),
        disable=not enabled,
        transient=False,
    )
    return prog, prog.add_task(label, total=total, completed=start, status="")
