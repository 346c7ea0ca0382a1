"""The training machinery of site heads: a network with named heads, site-balanced sampling, and one
resumable training phase.

A `MultiHeadNet` is the PlainConvUNet plus named head tensors; `forward(x, head)` runs the network with
that head's tensors swapped in. Freezing is `requires_grad=False`: SGD/Adam skip
parameters without gradients, so an optimizer over the whole module only moves the trainable tensors.

`run_phase` is the nnU-Net recipe of `weightzoo.train` (TrainConfig, DiceBCELoss, augment_batch, the
seeded per-step generators, poly lr, `train_step`, `evaluate_slices`, checkpoints) for a model called
as `model(x, cond)`. It re-seeds batch indices, augmentation and dropout from (seed, phase, step), so
resuming a killed phase gives the same weights as an uninterrupted one.

Sampling is balanced by site: each batch element picks a site uniformly, then a slice of that site (a
third of the batch from slices with foreground, as nnU-Net's oversampling).

3-D (VolumeSets, weightzoo.volume): the same, with patches instead of slices: each batch element picks
a site uniformly, then a patch of that site's cases (`VolumeSet.sample`, nnU-Net's foreground
oversampling), augmented by `augment_volumes`; validation on fixed `validation_patches`.
"""

from __future__ import annotations

import json
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from weightzoo.data.slices import SliceSet
from weightzoo.errors import InputError, ModelError
from weightzoo.heads.model import State, split_state
from weightzoo.nets.unet import real_state_dict
from weightzoo.segmenter import resolve_device
from weightzoo.train.augment import augment_batch, augment_rows
from weightzoo.train.checkpoint import CKPT_FORMAT, read_checkpoint, restore_checkpoint, save_checkpoint
from weightzoo.train.config import TrainConfig
from weightzoo.train.distributed import DataParallel
from weightzoo.train.loop import (
    autocast_dtype,
    evaluate_slices,
    history_from_json,
    history_to_json,
    make_optimizer,
    poly_lr,
    sample_indices,
    step_generator,
    step_seed,
    train_step,
)
from weightzoo.train.losses import DiceBCELoss
from weightzoo.volume.patches import Patches, VolumeSet, augment_volumes

_DATA, _AUGMENT, _TORCH = 0, 1, 2
# sampler(generator) -> (batch, cond): batch = slice indices [B] (SliceSets) or patches (x, y) (VolumeSets)
Sampler = Callable[[torch.Generator], tuple[Any, Any]]
Data = SliceSet | VolumeSet


# ---- the trainable module ---------------------------------------------------------------------------
class _Tensors(nn.Module):
    """One head's tensors as parameters (names kept in a list: parameter names cannot hold dots)."""

    def __init__(self, state: State):
        super().__init__()
        self.keys = sorted(state)
        self.values = nn.ParameterList(
            [
                nn.Parameter(state[k].detach().clone(), requires_grad=state[k].is_floating_point())
                for k in self.keys
            ]
        )

    def as_dict(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.keys, self.values, strict=True))

    def state(self) -> State:
        return {k: v.detach().cpu().clone() for k, v in self.as_dict().items()}


class MultiHeadNet(nn.Module):
    """PlainConvUNet + named heads. forward(x [B, C, H, W], head name) -> logits [B, K, H, W].

    The network's own head tensors are placeholders that forward never uses (and so never trains).
    """

    def __init__(self, net: nn.Module, heads: dict[str, State]):
        super().__init__()
        self.net = net
        self.names = list(heads)
        self.heads = nn.ModuleList([_Tensors(heads[n]) for n in self.names])
        self.head_keys = set(self.heads[0].keys)

    def forward(self, x: torch.Tensor, head: str) -> torch.Tensor:
        # Swap the head's parameters into their owning modules for this call, then restore. Not
        # torch.func.functional_call: nnU-Net registers each conv block twice (`convs.0.conv` is
        # `convs.0.all_modules.0`), and functional_call then restores the wrong tensor.
        slots = [self._slot(k) for k in self.heads[0].keys]
        saved = [table[attr] for table, attr in slots]
        try:
            for (table, attr), v in zip(slots, self.heads[self.names.index(head)].values, strict=True):
                table[attr] = v
            return self.net(x)
        finally:
            for (table, attr), v in zip(slots, saved, strict=True):
                table[attr] = v

    def _slot(self, name: str) -> tuple[dict[str, Any], str]:
        """The parameter (or buffer) table of the module owning `name`, and the key in it."""
        owner, _, attr = name.rpartition(".")
        module = self.net.get_submodule(owner)
        return (module._parameters if attr in module._parameters else module._buffers), attr

    def set_trainable(self, backbone: bool, heads: list[str]) -> None:
        for name, p in self.net.named_parameters():
            p.requires_grad_(backbone and name not in self.head_keys)
        for n, h in zip(self.names, self.heads, strict=True):
            h.requires_grad_(n in heads)

    def backbone_state(self) -> State:
        state = {k: v.detach().cpu().clone() for k, v in real_state_dict(self.net).items()}
        return split_state(state, sorted(self.head_keys))[0]

    def head_state(self, head: str) -> State:
        return self.heads[self.names.index(head)].state()


class _Bound(nn.Module):
    """model(x, cond) as a one-argument module, for `train_step` and `evaluate_slices`."""

    def __init__(self, model: nn.Module, cond: Any):
        super().__init__()
        self.model, self.cond = model, cond

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x, self.cond)


# ---- sampling ---------------------------------------------------------------------------------------
@dataclass
class SitePools:
    """Slice indices of a SliceSet grouped by site: all slices, and per task those with foreground."""

    sites: list[str]
    index: list[torch.Tensor]
    fg: list[list[torch.Tensor]]

    @classmethod
    def of(cls, s: SliceSet, sites: list[str] | None = None) -> SitePools:
        sites = sites or s.sites()
        site_of = np.array([m["site"] for m in s.meta])
        index, fg = [], []
        for site in sites:
            idx = np.flatnonzero(site_of == site)
            if not len(idx):
                raise InputError(f"no training slices of site '{site}'", "check the dataset's splits")
            index.append(torch.from_numpy(idx))
            fg.append(
                [
                    torch.from_numpy(np.flatnonzero(s.labels[idx, k].any(axis=(1, 2))))
                    for k in range(len(s.tasks))
                ]
            )
        return cls(list(sites), index, fg)


def site_balanced_indices(
    generator: torch.Generator, pools: SitePools, batch_size: int, oversample: float
) -> torch.Tensor:
    """Batch indices: each element's site drawn uniformly, then nnU-Net's foreground-oversampled
    draw (`sample_indices`) within the site. With one site it is `sample_indices` on that site."""
    which = torch.randint(len(pools.sites), (batch_size,), generator=generator)
    out = []
    for s in range(len(pools.sites)):
        m = int((which == s).sum())
        if m:
            local = sample_indices(generator, len(pools.index[s]), pools.fg[s], m, oversample)
            out.append(pools.index[s][local])
    return torch.cat(out)


@dataclass
class VolumePools:
    """The cases of a VolumeSet grouped by site (one VolumeSet per site) and the patch size [z, y, x]."""

    sites: list[str]
    sets: list[VolumeSet]
    size: tuple[int, ...]

    @classmethod
    def of(cls, v: VolumeSet, sites: list[str] | None = None) -> VolumePools:
        sites = sites or v.sites()
        sets = []
        for site in sites:
            idx = [i for i, s in enumerate(v.case_sites) if s == site]
            if not idx:
                raise InputError(f"no training cases of site '{site}'", "check the dataset's splits")
            sets.append(v.select(idx))
        return cls(list(sites), sets, volume_patch(v))


def volume_patch(v: VolumeSet) -> tuple[int, ...]:
    """The patch [z, y, x] the volumes' model is trained and predicts on (its pipeline's)."""
    from weightzoo.volume.preprocess import VolumePipeline

    return tuple(VolumePipeline.from_dict(v.preprocessing.pipeline).patch_size)


def site_balanced_patches(
    generator: torch.Generator, pools: VolumePools, batch_size: int, oversample: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of patches (images [B, C, z, y, x], labels [B, K, z, y, x]): each element's site drawn
    uniformly, then its patch drawn from that site's cases by `VolumeSet.sample`. As in nnU-Net the
    last round(B·oversample) elements of the batch are centred on foreground, whatever their sites
    (per-site batches of 3-D runs are often 1 patch, and would otherwise never oversample)."""
    which = torch.randint(len(pools.sites), (batch_size,), generator=generator)
    n_fg = batch_size - round(batch_size * (1 - oversample))
    forced = torch.arange(batch_size) >= batch_size - n_fg
    xs: list[torch.Tensor | None] = [None] * batch_size
    ys: list[torch.Tensor | None] = [None] * batch_size
    for s in range(len(pools.sites)):
        mine = (which == s).nonzero().squeeze(1)
        m = len(mine)
        if m:  # the forced ones come last in `mine`, as `sample` centres its last k on foreground
            k = int(forced[mine].sum())
            x, y = pools.sets[s].sample(generator, m, pools.size, k / m)
            for j, b in enumerate(mine.tolist()):
                xs[b], ys[b] = x[j], y[j]
    return torch.stack(xs), torch.stack(ys)  # type: ignore[arg-type]


def site_pools(data: Data, sites: list[str] | None = None) -> SitePools | VolumePools:
    """Slices (SitePools) or volumes (VolumePools) of `data` grouped by site."""
    return VolumePools.of(data, sites) if isinstance(data, VolumeSet) else SitePools.of(data, sites)


def site_balanced_batch(
    generator: torch.Generator, pools: SitePools | VolumePools, batch_size: int, oversample: float
) -> Any:
    """What a sampler returns as its batch: slice indices (SitePools) or patches (VolumePools)."""
    if isinstance(pools, VolumePools):
        return site_balanced_patches(generator, pools, batch_size, oversample)
    return site_balanced_indices(generator, pools, batch_size, oversample)


def site_subset(data: Data, site: str) -> Data:
    """The slices or cases of one site."""
    if isinstance(data, VolumeSet):
        return data.select([i for i, s in enumerate(data.case_sites) if s == site])
    return data.where(site=site)


def eval_set(data: Data | Patches) -> SliceSet | Patches:
    """What `evaluate_slices` reads: slices as they are, volumes as their fixed validation patches."""
    return data.validation_patches(volume_patch(data)) if isinstance(data, VolumeSet) else data


def _phase_seed(seed: int, phase: str) -> int:
    """Each phase (and site) gets its own streams, all derived from the run's seed."""
    return int(step_seed(seed, zlib.crc32(phase.encode()), 7) % (2**62))


# ---- one phase --------------------------------------------------------------------------------------
@dataclass
class PhaseResult:
    history: list[dict[str, Any]]
    seconds: float
    finished: bool
    resumed_from: int = 0
    steps_run: int = 0  # steps run by this call (resumed runs: fewer than cfg.steps)
    info: dict[str, Any] = field(default_factory=dict)


def run_phase(
    model: nn.Module,
    train: Data,
    sampler: Sampler,
    cfg: TrainConfig,
    phase: str,
    val: tuple[Any, Data] | list[tuple[Any, Data]] | None = None,
    run_dir: Path | None = None,
    identity: dict[str, Any] | None = None,
    progress: bool = False,
    stop_after: int | None = None,
    step_losses: list[float] | None = None,
) -> PhaseResult:
    """Train `model(x, cond)`'s trainable parameters for cfg.steps steps (cfg.learning_rate, poly).

    sampler(generator) -> (indices into train [B], cond), or for a VolumeSet ((patches, labels), cond)
    (see `site_balanced_batch`); val = (cond, slices or volumes), or a list of them
    (the logged loss and Dice per task are then means over the list), validated every
    cfg.val_every steps (Dice per task). With `run_dir`, a checkpoint is written every
    cfg.checkpoint_every steps and resumed from when its `identity` matches (else a ModelError).
    `stop_after`: return unfinished (as if killed) once this call has run that many steps (tests).
    `step_losses`: if given, every step's training loss is appended to it (loss-spike counts).
    Under torchrun (weightzoo.train.distributed): each rank trains on its rows of the global batch;
    rank 0 alone validates and writes checkpoints.
    """
    dp, device = DataParallel.start(None, resolve_device(cfg.device))
    if dp.active and dp.options.split != "batch":
        raise InputError(
            f"--split {dp.options.split} shards data for `weightzoo train` / `base train` only",
            "use --split batch (the default) for this route",
        )
    vals = [] if val is None else val if isinstance(val, list) else [val]
    vals = [(c, eval_set(s)) for c, s in vals]
    volumes = isinstance(train, VolumeSet)
    model.to(device).train()
    wrapped = dp.wrap(model, static_graph=False)  # heads/conditions used can change per batch
    optimizer = make_optimizer(model, cfg)
    loss_fn, amp = DiceBCELoss(), autocast_dtype(cfg, device)
    seed = _phase_seed(cfg.seed, phase)
    identity = json.loads(json.dumps({"phase": phase, **(identity or {}), **dp.identity()}))
    start, history, before, loss_sum, loss_n = 0, [], 0.0, 0.0, 0
    ckpt = read_checkpoint(run_dir) if run_dir is not None else None
    dp.barrier()  # every rank has read the checkpoint before rank 0 may replace it
    if ckpt is not None:
        if ckpt[1].get("run") != identity:
            raise ModelError(
                f"it holds a checkpoint of another '{phase}' run",
                "use --force to start again, or the command and options of the interrupted run",
                run_dir,
            )
        restore_checkpoint(model, optimizer, dp.restore(ckpt[0]), ckpt[1])
        dp.to_device(device)
        st = ckpt[1]
        start, history, before = int(st["step"]), history_from_json(st["history"]), float(st["seconds"])
        loss_sum, loss_n = float(st["loss_sum"]), int(st["loss_n"])
    dp.ready(model, start)
    rows = dp.rows(cfg.batch_size)
    if not volumes:
        x_all = torch.from_numpy(np.ascontiguousarray(train.images)).to(device)
        y_all = torch.from_numpy(np.ascontiguousarray(train.labels)).to(device)
    t0 = time.perf_counter()

    def seconds() -> float:
        return before + time.perf_counter() - t0

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    prog = Progress(
        TextColumn(f"[bold]{phase}[/]"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        disable=not (progress and dp.is_writer),
    )
    with prog:
        bar = prog.add_task(phase, total=cfg.steps, completed=start)
        for step in range(start, cfg.steps):
            lr = poly_lr(cfg.learning_rate, step, cfg.steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            idx, cond = sampler(step_generator(seed, step, _DATA))  # indices, or patches (x, y)
            aug_gen = step_generator(seed, step, _AUGMENT)
            if volumes:  # patches, augmented on the CPU as the whole batch (as weightzoo.train)
                xb, yb = augment_volumes(*idx, cfg.augment, aug_gen)
                if rows is not None:
                    n = len(xb)
                    xb, yb = xb[rows], yb[rows]
                    if torch.is_tensor(cond) and cond.dim() > 0 and len(cond) == n:
                        cond = cond[rows]
                xb, yb = xb.to(device), yb.to(device)
            elif rows is None:
                xb, yb = augment_batch(x_all[idx.to(device)], y_all[idx.to(device)], cfg.augment, aug_gen)
            else:  # this rank's rows of the global batch (and of a per-sample condition)
                own = idx[rows].to(device)
                xb, yb = augment_rows(x_all[own], y_all[own], cfg.augment, aug_gen, len(idx), rows)
                if torch.is_tensor(cond) and cond.dim() > 0 and len(cond) == len(idx):
                    cond = cond[rows]
            torch.manual_seed(step_seed(dp.seed(seed), step, _TORCH))  # dropout
            cond = cond.to(device) if torch.is_tensor(cond) else cond
            net = _Bound(dp.model(step, model, wrapped), cond)
            loss = train_step(net, optimizer, dp.loss(step, loss_fn), xb, yb, amp, cfg.grad_clip)
            loss_sum, loss_n, done = loss_sum + float(loss), loss_n + 1, step + 1
            dp.after_step(done, cfg.steps, lr, model, optimizer)
            if step_losses is not None:
                step_losses.append(float(loss))
            if done % cfg.val_every == 0 or done == cfg.steps:
                entry: dict[str, Any] = {"step": done, "train_loss": loss_sum / loss_n, "lr": lr}
                if vals and dp.is_writer:
                    vloss, vdice = _validate(model, vals, loss_fn, device, amp)
                    entry.update(val_loss=vloss, val_dice=dict(zip(cfg.tasks, vdice, strict=True)))
                entry["seconds"] = round(seconds(), 3)
                history.append(entry)
                loss_sum, loss_n = 0.0, 0
            if run_dir is not None and done % cfg.checkpoint_every == 0 and done < cfg.steps:
                state = {
                    "format": CKPT_FORMAT,
                    "version": 1,
                    "step": done,
                    "run": identity,
                    "history": history_to_json(history),
                    "seconds": seconds(),
                    "loss_sum": loss_sum,
                    "loss_n": loss_n,
                }
                extra = dp.checkpoint_extra(model, optimizer)  # a collective: every rank
                if dp.is_writer:
                    save_checkpoint(run_dir, model, optimizer, state, extra)
            prog.update(bar, completed=done)
            if stop_after is not None and done - start >= stop_after and done < cfg.steps:
                return PhaseResult(history, seconds(), False, start, done - start)
    model.eval()
    return PhaseResult(history, seconds(), True, start, cfg.steps - start, dp.summary())


def _validate(
    model: nn.Module,
    vals: list[tuple[Any, SliceSet | Patches]],
    loss_fn: DiceBCELoss,
    device: torch.device,
    amp: Any,
) -> tuple[float, list[float]]:
    """Mean over (cond, slices) pairs of val loss and Dice per task (NaN where no pair has foreground)."""
    results = [evaluate_slices(_Bound(model, c), s, loss_fn, device, amp) for c, s in vals]
    dice = np.array([d for _, d in results], dtype=float)  # [pairs, tasks]
    per_task = [
        float(np.mean(col[~np.isnan(col)])) if (~np.isnan(col)).any() else float("nan") for col in dice.T
    ]
    return float(np.mean([v for v, _ in results])), per_task


@torch.no_grad()
def val_dice(
    model: nn.Module, cond: Any, val: Data | None, tasks: list[str], device: str
) -> dict[str, float | None]:
    """Pseudo Dice per task (counts summed over the slices, or a VolumeSet's validation patches) of
    model(x, cond) on `val`; {} without."""
    if val is None or not len(val):
        return {}
    _, dice = evaluate_slices(_Bound(model, cond), eval_set(val), DiceBCELoss(), resolve_device(device))
    return {t: None if np.isnan(d) else round(float(d), 4) for t, d in zip(tasks, dice, strict=True)}
