"""One training run with nnU-Net's 2-D recipe, resumable bit-exactly after a kill at any moment.

Recipe (nnU-Net v2 defaults, iterations instead of epochs): PlainConvUNet with one sigmoid output per
task, Dice + BCE loss, SGD (Nesterov, momentum 0.99, lr 1e-2, weight decay 3e-5) or Adam (lr 1e-3),
poly learning rate `lr·(1 - step/steps)^0.9`, gradient clipping at norm 12, on-the-fly augmentation,
and a third of every batch drawn from slices that contain foreground.

Reproducibility: the network is initialised from `seed`; the batch indices, the augmentation and the
global torch RNG (dropout) are re-seeded at every step from (seed, step). A run therefore depends only
on its config and its data, and resuming from a checkpoint gives the same weights (torch.equal on the
CPU) as an uninterrupted run. The global RNG states (torch, numpy, python) are also saved and restored.

Files in `out_dir`:
  checkpoint_latest.safetensors/.json  resumable state (see weightzoo.train.checkpoint), while running
  log.json                             history: step, train loss, val loss, val Dice per task, lr, seconds
  model.json, model.safetensors        the finished model (weightzoo.segmenter); checkpoints are then removed
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from weightzoo.data.raw import RawDataset
from weightzoo.data.slices import Preprocessing, SliceSet, load_slices
from weightzoo.errors import InputError, ModelError
from weightzoo.fileio import atomic_write_json, read_json
from weightzoo.nets.unet import ArchSpec, build_network, load_real_state_dict
from weightzoo.segmenter import (
    MODEL_JSON,
    MODEL_WEIGHTS,
    NetSegmenter,
    make_segmenter,
    read_model_json,
    resolve_device,
    save_model,
)
from weightzoo.train.augment import augment_batch, augment_rows
from weightzoo.train.checkpoint import (
    CKPT_FORMAT,
    CKPT_JSON,
    CKPT_WEIGHTS,
    read_checkpoint,
    restore_checkpoint,
    save_checkpoint,
)
from weightzoo.train.config import DEFAULT_LR, OPTIMIZERS, RUN_ONLY_KEYS, TrainConfig, load_config_file
from weightzoo.train.distributed import DataParallel, DistOptions, current_options, shard_cases
from weightzoo.train.losses import DiceBCELoss
from weightzoo.train.steps import (
    autocast_dtype,
    determinism,
    diverged,
    evaluate_slices,
    format_dice,
    history_from_json,
    history_to_json,
    make_optimizer,
    poly_lr,
    progress_bar,
    sample_indices,
    slices_hash,
    step_generator,
    step_seed,
    train_step,
    weights_finite,
)
from weightzoo.volume.patches import VolumeSet, augment_volumes

__all__ = [
    "CKPT_JSON",
    "CKPT_WEIGHTS",
    "DEFAULT_LR",
    "LOG_JSON",
    "OPTIMIZERS",
    "RUN_ONLY_KEYS",
    "StartFrom",
    "TrainConfig",
    "TrainResult",
    "autocast_dtype",
    "determinism",
    "diverged",
    "evaluate_slices",
    "format_dice",
    "history_from_json",
    "history_to_json",
    "load_config_file",
    "make_optimizer",
    "poly_lr",
    "progress_bar",
    "sample_indices",
    "slices_hash",
    "step_generator",
    "step_seed",
    "train_model",
    "train_on_slices",
    "train_step",
    "weights_finite",
]

LOG_JSON = "log.json"
# Random streams of one step: step_generator(seed, step, STREAM_*). Shared with the zoo's trainers, so a
# zoo run and `weightzoo train` with the same config draw the same batches.
STREAM_DATA, STREAM_AUGMENT, STREAM_TORCH = 0, 1, 2


@dataclass(frozen=True)
class StartFrom:
    """Fine-tune from given weights instead of a seeded init (e.g. a pruned network).

    spec/state: the network to start from (its own ArchSpec: a structurally pruned net is smaller
    than any preset). keep_zero: weights that are exactly zero in `state` (pruning masks) get zero
    gradients and stay zero through every optimizer step.
    """

    spec: ArchSpec
    state: dict[str, torch.Tensor]
    keep_zero: bool = False

    def fingerprint(self) -> str:
        h = hashlib.sha256(json.dumps([self.spec.hash(), self.keep_zero]).encode())
        for k in sorted(self.state):
            h.update(k.encode())
            h.update(self.state[k].detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    def build(self, device: torch.device) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
        """The network on `device`, and {param name: 0/1 mask} of the weights kept at zero."""
        net = load_real_state_dict(build_network(self.spec), self.state).to(device)
        masks: dict[str, torch.Tensor] = {}
        if self.keep_zero:
            for name, p in net.named_parameters():
                if p.dim() > 1 and not bool((p != 0).all()):
                    masks[name] = (p != 0).to(p.dtype)
                    p.register_hook(lambda g, m=masks[name]: g * m)
        return net, masks


@dataclass
class TrainResult:
    segmenter: NetSegmenter  # or a VolumeSegmenter for 3-D runs
    history: list[dict[str, Any]]
    seconds: float  # training wall-clock, summed over resumed calls
    out_dir: Path
    finished: bool = True  # False when stopped early by `stop_after`
    skipped: bool = False  # True when out_dir already held this finished run
    resumed_from: int = 0  # step the run resumed from (0 = fresh start)
    info: dict[str, Any] = field(default_factory=dict)


def _differences(a: dict[str, Any], b: dict[str, Any]) -> str:
    ca, cb = a.get("config", {}), b.get("config", {})
    diffs = [
        f"{k}: {ca.get(k)!r} vs {cb.get(k)!r}" for k in sorted(set(ca) | set(cb)) if ca.get(k) != cb.get(k)
    ]
    if a.get("data_hash") != b.get("data_hash"):
        diffs.append("other training data")
    if a.get("distributed") != b.get("distributed"):
        diffs.append("another torchrun set-up (number of processes or --ddp/--local-sgd options)")
    if a.get("arch_hash") != b.get("arch_hash") and not diffs:
        diffs.append("other architecture")
    return "; ".join(diffs[:4]) or "unknown difference"


def _clear_run(out_dir: Path) -> None:
    for name in (CKPT_WEIGHTS, CKPT_JSON, LOG_JSON, MODEL_JSON, MODEL_WEIGHTS):
        (out_dir / name).unlink(missing_ok=True)


# ---- the run ---------------------------------------------------------------------------------------
def _check_volumes(train: VolumeSet, val: VolumeSet | None, cfg: TrainConfig) -> None:
    if cfg.dims != 3:
        raise InputError(
            f"3-D training volumes were given with the {cfg.dims}-D preset '{cfg.preset}'",
            "use a 3-D preset (tiny3d, small3d, default3d) or --dims 3",
        )
    for name, v in (("training", train), ("validation", val)):
        if v is not None and (len(v) == 0 or list(v.tasks) != list(cfg.tasks)):
            raise InputError(
                f"the {name} volumes are empty or hold other tasks", "check the splits and --task"
            )
    for task, present in zip(cfg.tasks, train.has_foreground(), strict=True):
        if not present:
            raise InputError(
                f"task '{task}': its label values appear in none of the {len(train)} training cases",
                "check the task's label values in dataset.json (`weightzoo data info`) and the sites chosen",
            )


def _check_slices(train: SliceSet, val: SliceSet | None, cfg: TrainConfig) -> None:
    if cfg.dims != 2:
        raise InputError(
            f"2-D slices were given with the 3-D preset '{cfg.preset}'",
            "train 3-D presets on volumes (--dims 3)",
        )
    for name, s in (("training", train), ("validation", val)):
        if s is None:
            continue
        if len(s) == 0:
            raise InputError(f"the {name} set is empty", "check the dataset's splits and sites")
        if list(s.tasks) != list(cfg.tasks):
            raise InputError(
                f"{name} slices have tasks {s.tasks}, the config {cfg.tasks}",
                "load the slices for the config's tasks",
            )
        if tuple(s.images.shape[-2:]) != tuple(cfg.size):
            raise InputError(
                f"{name} slices are {list(s.images.shape[-2:])} px, the config says size {list(cfg.size)}",
                "load the slices with Preprocessing(size=cfg.size)",
            )
        if s.images.shape[1] != train.images.shape[1] or s.labels.shape[1] != len(cfg.tasks):
            raise InputError(
                f"{name} slices have {s.images.shape[1]} channels / {s.labels.shape[1]} tasks",
                "use one dataset",
            )
    # A task whose label values appear in no training mask would train to an all-background net
    # (Dice 0) with exit 0: usually a wrong label value in dataset.json's `tasks`.
    present = np.asarray(train.labels).reshape(len(train), len(cfg.tasks), -1).max(axis=(0, 2))  # [K]
    for k, task in enumerate(cfg.tasks):
        if not present[k]:
            raise InputError(
                f"task '{task}': its label values appear in none of the {len(train.cases())} training cases",
                "check the task's label values in dataset.json (`weightzoo data info`) and the sites chosen",
            )


def patch_size(cfg: TrainConfig) -> tuple[int, ...]:
    """A 3-D config's patch in nnU-Net's axis order [z, y, x] (cfg.size is the NIfTI's [i, j, k])."""
    return tuple(reversed(cfg.size))


Draw = Callable[[int, int, int, "torch.Tensor | None"], tuple[torch.Tensor, torch.Tensor]]


def _batches(train: SliceSet | VolumeSet, cfg: TrainConfig, device: torch.device) -> Draw:
    """draw(draw_seed, step, draw_size, rows) -> this process's augmented batch (images, labels).

    The global batch of draw_size depends only on (draw_seed, step); `rows` (data-parallel ranks) picks
    this rank's rows of it, augmented as one process would. 2-D: nnU-Net-oversampled slice indices;
    3-D: nnU-Net-oversampled patches of cfg.size."""
    if isinstance(train, VolumeSet):
        size = patch_size(cfg)

        def draw_patches(
            seed: int, step: int, n: int, rows: torch.Tensor | None
        ) -> tuple[torch.Tensor, torch.Tensor]:
            x, y = train.sample(step_generator(seed, step, STREAM_DATA), n, size, cfg.foreground_oversample)
            x, y = augment_volumes(x, y, cfg.augment, step_generator(seed, step, STREAM_AUGMENT))
            if rows is not None:
                x, y = x[rows], y[rows]
            return x.to(device), y.to(device)

        return draw_patches

    x_all = torch.from_numpy(np.ascontiguousarray(train.images)).to(device)
    y_all = torch.from_numpy(np.ascontiguousarray(train.labels)).to(device)
    fg_by_task = [
        torch.from_numpy(np.flatnonzero(train.labels[:, k].any(axis=(1, 2)))) for k in range(len(cfg.tasks))
    ]

    def draw_slices(
        seed: int, step: int, n: int, rows: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        idx = sample_indices(
            step_generator(seed, step, STREAM_DATA), len(train), fg_by_task, n, cfg.foreground_oversample
        )
        aug_gen = step_generator(seed, step, STREAM_AUGMENT)
        if rows is None:
            dev_idx = idx.to(device)
            return augment_batch(x_all[dev_idx], y_all[dev_idx], cfg.augment, aug_gen)
        dev_idx = idx[rows].to(device)  # this rank's rows of the global batch, augmented as one process would
        return augment_rows(x_all[dev_idx], y_all[dev_idx], cfg.augment, aug_gen, n, rows)

    return draw_slices


def train_on_slices(
    train: SliceSet | VolumeSet,
    val: SliceSet | VolumeSet | None,
    cfg: TrainConfig,
    out_dir: str | Path,
    resume: bool = True,
    progress: bool = True,
    sites: list[str] | None = None,
    info: dict[str, Any] | None = None,
    force: bool = False,
    stop_after: int | None = None,
    start: StartFrom | None = None,
    route: str = "train",
    dist: DistOptions | None = None,
) -> TrainResult:
    """Train a PlainConvUNet (K sigmoid outputs) on `train`, validating on `val`; write a model folder.

    train/val: SliceSets, images [N, C, H, W] (H, W = cfg.size), labels [N, K, H, W], K = len(cfg.tasks);
      or, for a 3-D preset, VolumeSets (weightzoo.volume.patches), trained on patches of cfg.size.
    resume: continue from out_dir's checkpoint of the same run (False: start again from step 0).
    force: overwrite whatever out_dir holds (another run's checkpoint or a finished model).
    stop_after: stop (as if killed) once this many steps are done, without finishing — for tests.
    start: fine-tune these weights (cfg.preset and cfg.seed's init are then not used for the net).
    route: the model.json route of the result (e.g. "prune" for a fine-tuned pruned network).
    dist: data-parallel options under torchrun (weightzoo.train.distributed); rank 0 alone writes.
    If out_dir already holds this finished run, nothing is trained (`skipped=True`).
    """
    out_dir = Path(out_dir)
    volumes = isinstance(train, VolumeSet)
    if volumes:
        _check_volumes(train, val, cfg)  # type: ignore[arg-type]
    else:
        _check_slices(train, val, cfg)  # type: ignore[arg-type]
    spec = (
        start.spec
        if start is not None
        else ArchSpec.preset(
            cfg.preset,
            input_channels=train.n_channels if volumes else train.images.shape[1],  # type: ignore[union-attr]
            num_classes=len(cfg.tasks),
            dropout=cfg.dropout,
            patch=patch_size(cfg) if volumes else None,
            spacing=train.spacing if volumes else None,  # type: ignore[union-attr]
        )
    )
    dp, device = DataParallel.start(dist, resolve_device(cfg.device))
    ident: dict[str, Any] = {
        "config": cfg.identity(),
        "arch_hash": spec.hash(),
        "data_hash": dp.common_hash(train.data_hash() if volumes else slices_hash(train)),  # type: ignore[union-attr,arg-type]
    }
    if start is not None:
        ident["start"] = start.fingerprint()
    ident.update(dp.identity())
    identity = json.loads(json.dumps(ident))

    # What does out_dir already hold? (rank 0 alone changes it; the others read it after that)
    if force and dp.is_writer:
        _clear_run(out_dir)
    dp.barrier()
    if (out_dir / MODEL_JSON).exists():
        meta = read_model_json(out_dir)
        done = meta.get("info", {}).get("run")
        if done != identity:
            raise ModelError(
                f"the folder holds a finished model of another run ({_differences(done or {}, identity)})",
                "use another --out, or --force to overwrite it",
                out_dir,
            )
        from weightzoo.segmenter import load_model

        log = read_json(out_dir / LOG_JSON, "training log") if (out_dir / LOG_JSON).exists() else {}
        return TrainResult(
            load_model(out_dir, cfg.device),
            history_from_json(log.get("history", [])),
            float(meta.get("seconds_to_build", 0.0)),
            out_dir,
            finished=True,
            skipped=True,
            resumed_from=cfg.steps,
            info=meta.get("info", {}),
        )
    ckpt = read_checkpoint(out_dir)
    if ckpt is not None and ckpt[1].get("run") != identity:
        raise ModelError(
            f"it holds a checkpoint of another run ({_differences(ckpt[1].get('run') or {}, identity)})",
            "use another --out, or --force to start this run there from scratch",
            out_dir,
        )
    dp.barrier()  # every rank has read the checkpoint before rank 0 may clear or replace it
    if ckpt is not None and not resume:
        if dp.is_writer:
            _clear_run(out_dir)
        ckpt = None
    if dp.is_writer:
        out_dir.mkdir(parents=True, exist_ok=True)

    with determinism(device, cfg.deterministic):
        masks: dict[str, torch.Tensor] = {}
        if start is not None:
            net, masks = start.build(device)
        else:
            net = build_network(spec, seed=cfg.seed).to(device)
        if cfg.channels_last:
            net = net.to(memory_format=torch.channels_last)
        wrapped = dp.wrap(net)  # before restoring: DDP broadcasts rank 0's weights
        optimizer = make_optimizer(net, cfg)
        start, history, seconds_before, loss_sum, loss_n = 0, [], 0.0, 0.0, 0
        random.seed(cfg.seed)  # the loop draws from neither; seeded (and restored on resume) for hooks
        np.random.seed(cfg.seed)
        if ckpt is not None:
            restore_checkpoint(net, optimizer, dp.restore(ckpt[0]), ckpt[1])
            dp.to_device(device)
            st = ckpt[1]
            start, history, seconds_before = (
                int(st["step"]),
                history_from_json(st["history"]),
                float(st["seconds"]),
            )
            loss_sum, loss_n = float(st["loss_sum"]), int(st["loss_n"])
        net.train()
        loss_fn = DiceBCELoss()
        amp = autocast_dtype(cfg, device)
        draw = _batches(train, cfg, device)
        if volumes and val is not None:  # validate on fixed patches, as nnU-Net's pseudo Dice
            val = val.validation_patches(patch_size(cfg))  # type: ignore[union-attr]
        dp.ready(net, start)
        draw_size, draw_seed, rows = dp.batch_plan(cfg.batch_size, cfg.seed)
        run_info = {
            **(info or {}),
            "run": identity,
            "config": cfg.to_dict(),
            "sites": sites if sites is not None else train.sites(),
            **(
                {"n_train_cases": len(train), "n_val_patches": len(val) if val is not None else 0}
                if volumes
                else {"n_train_slices": len(train), "n_val_slices": len(val) if val is not None else 0}
            ),
        }
        t_start = time.perf_counter()

        def seconds() -> float:
            return seconds_before + time.perf_counter() - t_start

        def state(step: int) -> dict[str, Any]:
            return {
                "format": CKPT_FORMAT,
                "version": 1,
                "step": step,
                "run": identity,
                "config": cfg.to_dict(),
                "history": history_to_json(history),
                "seconds": seconds(),
                "loss_sum": loss_sum,
                "loss_n": loss_n,
                "generators": "batch indices, augmentation and dropout are re-seeded from (seed, step)",
            }

        prog, bar = progress_bar("[bold]train[/]", progress and dp.is_writer, cfg.steps, start)
        with prog:
            for step in range(start, cfg.steps):
                lr = poly_lr(cfg.learning_rate, step, cfg.steps)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                xb, yb = draw(draw_seed, step, draw_size, rows)
                if cfg.channels_last:
                    xb = xb.contiguous(memory_format=torch.channels_last)
                torch.manual_seed(step_seed(dp.seed(cfg.seed), step, STREAM_TORCH))  # dropout
                loss = train_step(
                    dp.model(step, net, wrapped),
                    optimizer,
                    dp.loss(step, loss_fn),
                    xb,
                    yb,
                    amp,
                    cfg.grad_clip,
                )
                if masks:  # zero gradients keep them at zero already; this guards against any drift
                    with torch.no_grad():
                        for name, p in net.named_parameters():
                            if name in masks:
                                p.mul_(masks[name])
                loss_sum += float(loss)
                loss_n += 1
                done = step + 1
                dp.after_step(done, cfg.steps, lr, net, optimizer)
                if not math.isfinite(float(loss)) or (
                    (done % cfg.checkpoint_every == 0 or done == cfg.steps) and not weights_finite(net)
                ):
                    raise diverged(done, float(loss), out_dir)
                if done % cfg.val_every == 0 or done == cfg.steps:
                    entry: dict[str, Any] = {"step": done, "train_loss": loss_sum / loss_n, "lr": lr}
                    if val is not None and dp.is_writer:
                        vloss, vdice = evaluate_slices(
                            net, val, loss_fn, device, amp, channels_last=cfg.channels_last
                        )
                        entry.update(val_loss=vloss, val_dice=dict(zip(cfg.tasks, vdice, strict=True)))
                    entry["seconds"] = round(seconds(), 3)
                    history.append(entry)
                    loss_sum, loss_n = 0.0, 0
                    if dp.is_writer:
                        atomic_write_json(
                            out_dir / LOG_JSON, {"config": cfg.to_dict(), "history": history_to_json(history)}
                        )
                    dice_s = format_dice(entry.get("val_dice", {}))
                    prog.update(
                        bar,
                        status=f"loss {entry['train_loss']:.3f}"
                        + (f" · val Dice {dice_s}" if dice_s else ""),
                    )
                if done % cfg.checkpoint_every == 0 and done < cfg.steps:
                    extra = dp.checkpoint_extra(net, optimizer)  # a collective: every rank
                    if dp.is_writer:
                        save_checkpoint(out_dir, net, optimizer, state(done), extra)
                prog.update(bar, completed=done)
                if stop_after is not None and done >= stop_after and done < cfg.steps:
                    seg = make_segmenter(
                        net, spec, cfg.tasks, train.preprocessing, out_dir.name, seconds(), device
                    )
                    return TrainResult(
                        seg, history, seconds(), out_dir, finished=False, resumed_from=start, info=run_info
                    )

        total = seconds()
        run_info["resumed_from"] = start
        run_info["final"] = history_to_json(history[-1:])[0] if history else {}
        run_info.update(dp.summary())
        if dp.is_writer:
            save_model(out_dir, net, spec, cfg.tasks, train.preprocessing, total, route=route, info=run_info)
            atomic_write_json(
                out_dir / LOG_JSON, {"config": cfg.to_dict(), "history": history_to_json(history)}
            )
            for name in (CKPT_WEIGHTS, CKPT_JSON):  # the model folder is the result; checkpoints are spent
                (out_dir / name).unlink(missing_ok=True)
        dp.barrier()
    seg = make_segmenter(net, spec, cfg.tasks, train.preprocessing, out_dir.name, total, device)
    return TrainResult(seg, history, total, out_dir, finished=True, resumed_from=start, info=run_info)


def train_model(
    ds: RawDataset | str | Path,
    cfg: TrainConfig,
    out_dir: str | Path,
    sites: list[str] | None = None,
    resume: bool = True,
    progress: bool = True,
    force: bool = False,
    stop_after: int | None = None,
    start: StartFrom | None = None,
    route: str = "train",
    info: dict[str, Any] | None = None,
    dist: DistOptions | None = None,
) -> TrainResult:
    """Train on a RawDataset's train split (by subject) of `sites`, validate on its val split.

    The test split is never read. model.json's info records the dataset, sites and split subjects.
    dist: under torchrun, data-parallel options; with `split` site/subject each rank loads only its
    own sites' / subjects' training cases (the consortium case), while rank 0 validates on all.
    """
    if not isinstance(ds, RawDataset):
        ds = RawDataset.open(ds)
    for t in cfg.tasks:
        ds.task_labels(t)  # UnknownNameError listing the dataset's tasks
    sites = [ds.check_site(s) for s in sites] if sites else None
    prep = Preprocessing(cfg.normalization, tuple(cfg.size), cfg.axis, ds.n_channels)
    train_cases, val_cases = ds.cases_in("train", sites), ds.cases_in("val", sites)
    if not train_cases:
        raise InputError(
            f"no training cases for sites {sites or 'all'}",
            "check the dataset's splits (weightzoo_splits.json)",
            ds.root,
        )
    dist = dist or current_options()
    by = ds.site if dist.split == "site" else ds.subject
    all_train_cases = train_cases
    train_cases = shard_cases(train_cases, by, dist)
    if cfg.dims == 3:
        from weightzoo.volume.data import load_volumes, volume_preprocessing

        # the median spacing over all training cases, so every rank plans alike
        prep = volume_preprocessing(ds, cfg, all_train_cases)
        train: SliceSet | VolumeSet = load_volumes(ds, cfg.tasks, train_cases, prep)
        val: SliceSet | VolumeSet | None = load_volumes(ds, cfg.tasks, val_cases, prep) if val_cases else None
    else:
        train = load_slices(ds, cfg.tasks, prep=prep, cases=train_cases)
        val = load_slices(ds, cfg.tasks, prep=prep, cases=val_cases) if val_cases else None
    info = {
        **(info or {}),
        "dataset": ds.name,
        "dataset_path": str(ds.root),
        "split": {
            "train": sorted({ds.subject(c) for c in train_cases}),
            "val": sorted({ds.subject(c) for c in val_cases}),
        },
        "cases": {"train": train_cases, "val": val_cases},
    }
    return train_on_slices(
        train,
        val,
        cfg,
        out_dir,
        resume,
        progress,
        sites or ds.sites(),
        info,
        force,
        stop_after,
        start,
        route,
        dist,
    )
