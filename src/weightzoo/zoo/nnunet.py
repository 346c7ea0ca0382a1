"""nnU-Net v2 results folders in and out: read a lab's trained nnU-Nets, write ours so nnU-Net runs them.

A results folder (`nnUNet_results/Dataset001_X/nnUNetTrainer__nnUNetPlans__2d/`) holds `plans.json`,
`dataset.json` and `fold_*/checkpoint_{final,best,latest}.pth`. nnU-Net writes each checkpoint with
`torch.save` of a dict: `network_weights` (the network's full state_dict, aliased keys included),
`optimizer_state`, `grad_scaler_state`, `logging` (lists per epoch, values often numpy float64),
`_best_ema`, `current_epoch`, `init_args` (plans, configuration, fold, dataset_json, a torch.device),
`trainer_name`, `inference_allowed_mirroring_axes`.

Checkpoints are unpickled with `torch.load(weights_only=True)` plus the explicit allow-list
`NNUNET_SAFE_GLOBALS` (numpy scalars and numeric arrays, which nnU-Net's logging contains); anything
else a pickle names (a class, a function) is refused with a one-line error, because unpickling it
could run arbitrary code. Only PlainConvUNet (the default `nnUNetPlans`) is supported.
"""

from __future__ import annotations

import copy
import io
import math
import pickle
import warnings
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from weightzoo.errors import InputError, ModelError
from weightzoo.fileio import atomic_write_bytes, atomic_write_json, plain_name, read_json
from weightzoo.nets.unet import (
    PLAIN_CONV_UNET,
    ArchSpec,
    build_network,
    check_arch_kwargs,
    check_state_dict,
    load_real_state_dict,
    real_state_dict,
)

CHECKPOINT_NAMES = ("checkpoint_final.pth", "checkpoint_best.pth", "checkpoint_latest.pth")
LOGGING_KEYS = (
    "mean_fg_dice",
    "ema_fg_dice",
    "dice_per_class_or_region",
    "train_losses",
    "val_losses",
    "lrs",
    "epoch_start_timestamps",
    "epoch_end_timestamps",
)
# our Preprocessing.normalization -> nnU-Net normalization scheme (percentile: nearest, see docs)
NORMALIZATION_SCHEMES = {
    "zscore": "ZScoreNormalization",
    "rgb": "RGBTo01Normalization",
    "percentile": "RescaleTo01Normalization",
}
NATURAL_IMAGE_ENDINGS = (".png", ".bmp", ".tif", ".tiff", ".jpg", ".jpeg")


def _numpy_safe_globals() -> list[Any]:
    """numpy scalars and numeric arrays: rebuilt from a dtype and raw bytes, no code runs.

    Object arrays stay refused (their dtype class is not listed). numpy 1 pickles name
    `numpy.core.multiarray`, numpy 2 `numpy._core.multiarray`: both names are listed."""
    try:
        from numpy._core import multiarray
    except ImportError:  # numpy < 2
        from numpy.core import multiarray  # type: ignore[no-redef]
    out: list[Any] = [np.dtype, np.ndarray]
    for fn in (multiarray.scalar, multiarray._reconstruct):
        out += [(fn, f"numpy.core.multiarray.{fn.__name__}"), (fn, f"numpy._core.multiarray.{fn.__name__}")]
    out += [
        type(np.dtype(c)) for c in ("?", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "f2", "f4", "f8")
    ]
    return out


# torch.device, OrderedDict, tensors and plain containers are allowed by torch's weights_only already.
NNUNET_SAFE_GLOBALS: list[Any] = _numpy_safe_globals()


def _allowed_names() -> set[str]:
    names = set()
    for g in NNUNET_SAFE_GLOBALS:
        names.add(g[1] if isinstance(g, tuple) else f"{g.__module__}.{g.__qualname__}")
    return names


def load_checkpoint_file(path: str | Path) -> dict[str, Any]:
    """`torch.load` an nnU-Net checkpoint safely (weights_only + the allow-list); one-line errors."""
    p = Path(path)
    if not p.is_file():
        raise InputError("checkpoint not found", "check the path", p)
    try:
        with torch.serialization.safe_globals(NNUNET_SAFE_GLOBALS):
            ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        try:
            refused = sorted(set(torch.serialization.get_unsafe_globals_in_checkpoint(p)) - _allowed_names())
        except Exception:
            refused = []
        what = (
            f"refused to unpickle {', '.join(refused)}"
            if refused
            else f"refused to unpickle an object ({str(e).splitlines()[-1][:120]})"
        )
        raise ModelError(
            f"{what}: weightzoo loads checkpoints with torch.load(weights_only=True) and allows only "
            "tensors, plain containers, torch.device and numpy numbers, because unpickling other "
            "objects can run arbitrary code",
            "if you trust the file, re-save it with plain types only (see docs/nnunet_interop.md)",
            p,
        ) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as e:
        raise ModelError(
            f"not a readable PyTorch checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:120]})",
            "the file is truncated or corrupt; copy it again from the training machine",
            p,
        ) from None
    if not isinstance(ckpt, dict) or "network_weights" not in ckpt:
        raise ModelError(
            "not an nnU-Net v2 checkpoint (no 'network_weights')", "use fold_*/checkpoint_*.pth files", p
        )
    return ckpt


# ---- plans / dataset.json -> ArchSpec --------------------------------------------------------------
def output_heads(dataset_json: Mapping[str, Any]) -> tuple[list[str], str, dict[str, list[int]]]:
    """The network's output channels as nnU-Net's LabelManager defines them.

    Returns (names, kind, labels): region-based datasets (any label is a list of >1 values) have one
    sigmoid channel per non-background region; otherwise one softmax channel per label value,
    background included, in increasing value order."""
    labels = dict(dataset_json.get("labels") or {})
    labels.pop("ignore", None)
    if not labels:
        raise InputError("dataset.json has no 'labels'", "use the dataset.json nnU-Net trained with")

    def values(v: Any) -> list[int]:
        return sorted({int(x) for x in v}) if isinstance(v, (list, tuple)) else [int(v)]

    if any(isinstance(v, (list, tuple)) and len(v) > 1 for v in labels.values()):
        regions = {k: values(v) for k, v in labels.items() if values(v) != [0]}
        return list(regions), "sigmoid", regions
    by_value = sorted(labels.items(), key=lambda kv: values(kv[1])[0])
    return [k for k, _ in by_value], "softmax", {k: values(v) for k, v in by_value}


def _features(c: Mapping[str, Any], n: int) -> list[int]:
    return [min(int(c["UNet_base_num_features"]) * 2**i, int(c["unet_max_num_features"])) for i in range(n)]


def _legacy_architecture(c: Mapping[str, Any]) -> dict[str, Any]:
    """Plans of nnU-Net v2 < 2.3 (no `architecture` block), converted as nnU-Net's PlansManager does."""
    if c.get("UNet_class_name") != "PlainConvUNet":
        raise ModelError(
            f"network class {c.get('UNet_class_name')!r} is not supported",
            "weightzoo ingests PlainConvUNet (default nnUNetPlans) only",
        )
    n = len(c["n_conv_per_stage_encoder"])
    dim = len(c["patch_size"])
    return {
        "network_class_name": PLAIN_CONV_UNET,
        "arch_kwargs": {
            "n_stages": n,
            "features_per_stage": _features(c, n),
            "conv_op": f"torch.nn.modules.conv.Conv{dim}d",
            "kernel_sizes": copy.deepcopy(c["conv_kernel_sizes"]),
            "strides": copy.deepcopy(c["pool_op_kernel_sizes"]),
            "n_conv_per_stage": copy.deepcopy(c["n_conv_per_stage_encoder"]),
            "n_conv_per_stage_decoder": copy.deepcopy(c["n_conv_per_stage_decoder"]),
            "conv_bias": True,
            "norm_op": f"torch.nn.modules.instancenorm.InstanceNorm{dim}d",
            "norm_op_kwargs": {"eps": 1e-05, "affine": True},
            "dropout_op": None,
            "dropout_op_kwargs": None,
            "nonlin": "torch.nn.LeakyReLU",
            "nonlin_kwargs": {"inplace": True},
        },
    }


def _configuration(plans: Mapping[str, Any], name: str, source: str | Path) -> dict[str, Any]:
    """A plans configuration with `inherits_from` resolved (as nnU-Net's PlansManager does)."""
    configs = plans.get("configurations") or {}
    if name not in configs:
        raise InputError(
            f"plans have no configuration {name!r}", f"available: {', '.join(configs) or '(none)'}", source
        )
    c = copy.deepcopy(configs[name])
    if "inherits_from" in c:
        parent = _configuration(plans, c.pop("inherits_from"), source)
        parent.update(c)
        c = parent
    return c


def spec_from_plans(
    plans: Mapping[str, Any],
    configuration: str,
    dataset_json: Mapping[str, Any],
    source: str | Path = "plans",
) -> ArchSpec:
    """ArchSpec of an nnU-Net configuration; channels from dataset.json (channel_names, labels)."""
    c = _configuration(plans, configuration, source)
    try:
        arch = c["architecture"] if "architecture" in c else _legacy_architecture(c)
        name = arch["network_class_name"]
        kwargs = copy.deepcopy(arch["arch_kwargs"])
    except KeyError as e:
        raise InputError(
            f"plans configuration {configuration!r} lacks {e}", "use nnU-Net v2 plans", source
        ) from None
    if name != PLAIN_CONV_UNET:
        short = name.rsplit(".", 1)[-1]
        raise ModelError(
            f"network class {short} is not supported",
            f"weightzoo ingests {PLAIN_CONV_UNET.rsplit('.', 1)[-1]} (default nnUNetPlans) only; "
            "residual-encoder presets (nnUNetResEncUNet*Plans) cannot be ingested",
            source,
        )
    channels = dataset_json.get("channel_names") or dataset_json.get("modality")
    if not channels:
        raise InputError(
            "dataset.json has no 'channel_names'", "use the dataset.json nnU-Net trained with", source
        )
    heads, _, _ = output_heads(dataset_json)
    check_arch_kwargs(kwargs, len(channels), len(heads), source)
    return ArchSpec(kwargs, input_channels=len(channels), num_classes=len(heads))


# ---- reading -------------------------------------------------------------------------------------------
@dataclass
class IngestedCheckpoint:
    """One nnU-Net checkpoint, made ours: ArchSpec, real state dict, metrics at its epoch."""

    path: Path
    fold: str  # "0".."4" or "all"
    checkpoint: str  # final | best | latest
    spec: ArchSpec
    state: dict[str, torch.Tensor]  # real_state_dict (no aliased keys)
    epoch: int  # epochs completed (nnU-Net's `current_epoch`)
    metrics: dict[
        str, Any
    ]  # ema_fg_dice, mean_fg_dice, train_loss, val_loss, dice_per_class_or_region, best_ema
    history: dict[str, list[Any]]  # nnU-Net's logging lists up to `epoch`
    trainer_name: str
    configuration: str
    plans_name: str
    dataset_name: str
    tasks: list[str]  # name of each output channel
    output_kind: str  # "sigmoid" (regions, one channel per task) | "softmax" (labels, background first)
    task_labels: dict[str, list[int]]
    mirror_axes: tuple[int, ...] | None
    plans: dict[str, Any] = field(repr=False)
    dataset_json: dict[str, Any] = field(repr=False)
    info: dict[str, Any] = field(default_factory=dict)  # the `weightzoo` block of our own exports


def _plain(v: Any) -> Any:
    """numpy scalars/arrays -> Python floats/ints/lists (recursively)."""
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, torch.Tensor):
        return v.tolist()
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v


def _checkpoint_folders(folder: Path) -> list[Path]:
    if any(folder.glob("fold_*/checkpoint_*.pth")):
        return [folder]
    subs = sorted(p for p in folder.iterdir() if p.is_dir() and any(p.glob("fold_*/checkpoint_*.pth")))
    if not subs:
        raise InputError(
            "no nnU-Net checkpoints (fold_*/checkpoint_final.pth, _best, _latest) here",
            "point to a trainer folder such as nnUNet_results/Dataset001_X/nnUNetTrainer__nnUNetPlans__2d",
            folder,
        )
    return subs


def _strip_prefixes(weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """DDP (`module.`) and torch.compile (`_orig_mod.`) prefixes, should a checkpoint carry them."""
    out = {}
    for k, v in weights.items():
        for prefix in ("module.", "_orig_mod."):
            k = k.removeprefix(prefix)
        out[k] = v
    return out


def read_checkpoint(path: str | Path, folder: str | Path | None = None) -> IngestedCheckpoint:
    """Read one `fold_X/checkpoint_*.pth`; plans/dataset.json from its init_args, else from `folder`."""
    p = Path(path)
    folder = Path(folder) if folder is not None else p.parent.parent
    ckpt = load_checkpoint_file(p)
    init = ckpt.get("init_args") if isinstance(ckpt.get("init_args"), dict) else {}
    plans = init.get("plans") or (
        read_json(folder / "plans.json", "plans.json") if (folder / "plans.json").exists() else None
    )
    djson = init.get("dataset_json") or (
        read_json(folder / "dataset.json", "dataset.json") if (folder / "dataset.json").exists() else None
    )
    if plans is None or djson is None:
        missing = "plans.json" if plans is None else "dataset.json"
        raise InputError(
            f"{missing} not found (neither in the checkpoint's init_args nor next to fold_*)",
            "copy the whole trainer folder from nnUNet_results",
            folder,
        )
    configuration = plain_name(
        init.get("configuration") or folder.name.rsplit("__", 1)[-1], "configuration name", p
    )
    fold = plain_name(init.get("fold", p.parent.name.removeprefix("fold_")), "fold", p)
    trainer_name = plain_name(ckpt.get("trainer_name", folder.name.split("__")[0]), "trainer name", p)
    plans_name = str(plans.get("plans_name", "")) if isinstance(plans, dict) else ""
    if plans_name:
        plain_name(plans_name, "plans name", p)
    dataset_name = plain_name(
        (plans.get("dataset_name") if isinstance(plans, dict) else None)
        or djson.get("name", "")
        or "Dataset999_unnamed",
        "dataset name",
        p,
    )
    spec = spec_from_plans(plans, configuration, djson, p)
    weights = _strip_prefixes(ckpt["network_weights"])
    check_state_dict(spec, weights, str(p))
    real_names = real_state_dict(build_network(spec)).keys()
    state = {k: weights[k] for k in real_names}

    logging = ckpt.get("logging") if isinstance(ckpt.get("logging"), dict) else {}
    epoch = int(ckpt.get("current_epoch", 0) or 0)
    history = {k: _plain(list(v))[:epoch] for k, v in logging.items() if isinstance(v, (list, tuple))}

    def at_epoch(key: str) -> Any:
        values = history.get(key) or []
        return values[-1] if values and len(values) == epoch else None

    metrics = {
        "ema_fg_dice": at_epoch("ema_fg_dice"),
        "mean_fg_dice": at_epoch("mean_fg_dice"),
        "train_loss": at_epoch("train_losses"),
        "val_loss": at_epoch("val_losses"),
        "dice_per_class_or_region": at_epoch("dice_per_class_or_region"),
        "best_ema": _plain(ckpt.get("_best_ema")),
    }
    tasks, kind, task_labels = output_heads(djson)
    mirror = ckpt.get("inference_allowed_mirroring_axes")
    return IngestedCheckpoint(
        path=p,
        fold=fold,
        checkpoint=p.stem.removeprefix("checkpoint_"),
        spec=spec,
        state=state,
        epoch=epoch,
        metrics=metrics,
        history=history,
        trainer_name=trainer_name,
        configuration=configuration,
        plans_name=plans_name,
        dataset_name=dataset_name,
        tasks=tasks,
        output_kind=kind,
        task_labels=task_labels,
        mirror_axes=tuple(int(a) for a in mirror) if mirror is not None else None,
        plans=copy.deepcopy(dict(plans)),
        dataset_json=copy.deepcopy(dict(djson)),
        info=_plain(ckpt.get("weightzoo") or {}),
    )


def read_nnunet_results(folder: str | Path) -> list[IngestedCheckpoint]:
    """Every checkpoint of an nnU-Net v2 trainer folder (or of every trainer folder in a dataset
    folder), ordered by trainer folder, fold, then final/best/latest."""
    root = Path(folder)
    if not root.is_dir():
        raise InputError("nnU-Net results folder not found", "check the path", root)
    out = []
    for trainer_dir in _checkpoint_folders(root):
        folds = sorted(trainer_dir.glob("fold_*"), key=lambda d: (not d.name[5:].isdigit(), d.name))
        for fold_dir in folds:
            for name in CHECKPOINT_NAMES:
                if (fold_dir / name).is_file():
                    out.append(read_checkpoint(fold_dir / name, trainer_dir))
    if not out:
        raise InputError(f"no {' / '.join(CHECKPOINT_NAMES)} in fold_* folders", "check the folder", root)
    return out


# ---- writing ---------------------------------------------------------------------------------------------
def nnunet_dataset_json(
    channel_names: Sequence[str] | Mapping[str, str],
    tasks: Mapping[str, Sequence[int]],
    file_ending: str = ".nii.gz",
    name: str | None = None,
    num_training: int = 0,
) -> dict[str, Any]:
    """A region-based dataset.json whose heads are `tasks` in order (one sigmoid channel each).

    nnU-Net treats labels as regions only if some region has >1 value; when every task is a single
    label, each is written as [v, v] (same set, nnU-Net sees regions). `regions_class_order` paints
    each region with its most specific label value (the one in the fewest regions); overlapping
    regions are painted in channel order, so use nnU-Net's --save_probabilities for exact per-task output."""
    if not tasks:
        raise InputError("no tasks to export", "give at least one task")
    sets = {t: sorted({int(v) for v in vs}) for t, vs in tasks.items()}
    if any(not vs or 0 in vs for vs in sets.values()):
        raise InputError("every task needs foreground label values (not 0)", "check the dataset's tasks")
    pad = not any(len(vs) > 1 for vs in sets.values())
    labels: dict[str, Any] = {"background": 0}
    labels.update({t: (vs * 2 if pad and len(vs) == 1 else vs) for t, vs in sets.items()})
    order = [min(vs, key=lambda v: (sum(v in o for o in sets.values()), v)) for vs in sets.values()]
    names = (
        channel_names
        if isinstance(channel_names, Mapping)
        else {str(i): c for i, c in enumerate(channel_names)}
    )
    out: dict[str, Any] = {
        "channel_names": dict(names),
        "labels": labels,
        "regions_class_order": order,
        "numTraining": int(num_training),
        "file_ending": file_ending,
    }
    if name:
        out["name"] = name
    return out


def nnunet_plans(
    spec: ArchSpec,
    configuration: str = "2d",
    dataset_name: str = "Dataset999_weightzoo",
    plans_name: str = "nnUNetPlans",
    patch_size: Sequence[int] | None = None,
    normalization: str = "zscore",
    file_ending: str = ".nii.gz",
    batch_size: int = 12,
    spacing: Sequence[float] | None = None,
) -> dict[str, Any]:
    """A valid nnU-Net v2 plans file with one configuration whose architecture is `spec`; `spacing`
    (nnU-Net axis order) is the configuration's target spacing (default 1 mm)."""
    kernel = spec.arch_kwargs["kernel_sizes"]
    dim = len(kernel[0]) if isinstance(kernel[0], (list, tuple)) else 2
    divs = spec.size_divisors
    patch = [int(s) for s in patch_size] if patch_size is not None else [d * math.ceil(64 / d) for d in divs]
    if len(patch) != dim or any(s % d for s, d in zip(patch, divs, strict=True)):
        raise ModelError(
            f"patch size {patch} does not fit the network",
            f"give {dim} sizes, each a multiple of {divs[0] if len(set(divs)) == 1 else list(divs)}",
        )
    if normalization not in NORMALIZATION_SCHEMES:
        raise ModelError(
            f"unknown normalization {normalization!r}", f"use one of {list(NORMALIZATION_SCHEMES)}"
        )
    if normalization == "percentile":
        warnings.warn(
            "nnU-Net has no per-image percentile normalisation; exporting RescaleTo01Normalization",
            stacklevel=2,
        )
    n_ch = spec.input_channels
    resample = {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None}
    config = {
        "data_identifier": f"{plans_name}_{configuration}",
        "preprocessor_name": "DefaultPreprocessor",
        "batch_size": batch_size,
        "patch_size": patch,
        "median_image_size_in_voxels": [float(s) for s in patch],
        "spacing": [float(v) for v in spacing] if spacing is not None else [1.0] * dim,
        "normalization_schemes": [NORMALIZATION_SCHEMES[normalization]] * n_ch,
        "use_mask_for_norm": [False] * n_ch,
        "resampling_fn_data": "resample_data_or_seg_to_shape",
        "resampling_fn_seg": "resample_data_or_seg_to_shape",
        "resampling_fn_data_kwargs": resample,
        "resampling_fn_seg_kwargs": {**resample, "is_seg": True, "order": 1},
        "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
        "resampling_fn_probabilities_kwargs": {**resample, "order": 1},
        "architecture": spec.to_nnunet_architecture(),
        "batch_dice": True,
    }
    natural = file_ending.lower() in NATURAL_IMAGE_ENDINGS
    intensity = {
        "max": 1.0,
        "mean": 0.0,
        "median": 0.0,
        "min": 0.0,
        "percentile_00_5": 0.0,
        "percentile_99_5": 1.0,
        "std": 1.0,
    }
    return {
        "dataset_name": dataset_name,
        "plans_name": plans_name,
        "original_median_spacing_after_transp": ([999.0] if natural or dim == 2 else [])
        + (config["spacing"] if dim == 3 else [1.0] * dim),
        "original_median_shape_after_transp": ([1] if natural or dim == 2 else []) + list(patch),
        "image_reader_writer": "NaturalImage2DIO" if natural else "SimpleITKIO",
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "configurations": {configuration: config},
        "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {str(c): dict(intensity) for c in range(n_ch)},
    }


def write_nnunet_results(
    out_dir: str | Path,
    spec: ArchSpec,
    state: Mapping[str, torch.Tensor],
    dataset_json: Mapping[str, Any],
    plans: Mapping[str, Any] | None = None,
    configuration: str = "2d",
    fold: int | str = 0,
    trainer_name: str = "nnUNetTrainer",
    checkpoint_name: str = "checkpoint_final.pth",
    history: Mapping[str, Sequence[Any]] | None = None,
    mirror_axes: Sequence[int] | None = None,
    info: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    **plans_kwargs: Any,
) -> Path:
    """Write an nnU-Net v2 trainer folder that nnU-Net's nnUNetPredictor loads; returns the .pth path.

    `out_dir` becomes the trainer folder (name it like `Dataset501_X/nnUNetTrainer__nnUNetPlans__2d`).
    `dataset_json` must have `spec.input_channels` channels and `spec.num_classes` heads (see
    `nnunet_dataset_json`). `plans`: an existing plans dict (its configuration's architecture is set
    from `spec`), else `nnunet_plans(spec, configuration, **plans_kwargs)`. `history`: nnU-Net
    logging lists (one value per epoch); `current_epoch` = their length. `info`: plain JSON-able
    provenance stored under the checkpoint's `weightzoo` key. Only tensors and plain Python types
    are pickled, so `torch.load(weights_only=True)` reads the file with no allow-list."""
    out = Path(out_dir)
    ckpt_path = out / f"fold_{fold}" / checkpoint_name
    if ckpt_path.exists() and not overwrite:
        raise InputError(
            "checkpoint already exists",
            "choose another folder or pass --overwrite (overwrite=True)",
            ckpt_path,
        )
    check_state_dict(spec, dict(state), "weights to export")
    channels = dataset_json.get("channel_names") or {}
    heads, _, _ = output_heads(dataset_json)
    if len(channels) != spec.input_channels or len(heads) != spec.num_classes:
        raise ModelError(
            f"dataset.json has {len(channels)} channel(s) and {len(heads)} output head(s), the network "
            f"{spec.input_channels} and {spec.num_classes}",
            "build the dataset.json with nnunet_dataset_json(channel_names, tasks)",
        )
    if plans is not None and plans_kwargs:
        raise InputError(
            f"{sorted(plans_kwargs)} only apply when no plans are given", "set them in the plans"
        )
    if plans is None:
        plans_kwargs.setdefault("file_ending", dataset_json.get("file_ending", ".nii.gz"))
        plans_out = nnunet_plans(spec, configuration, **plans_kwargs)
    else:
        plans_out = copy.deepcopy(dict(plans))
        config = plans_out.setdefault("configurations", {}).setdefault(configuration, {})
        for legacy in ("UNet_class_name", "UNet_base_num_features", "n_conv_per_stage_encoder",
                       "n_conv_per_stage_decoder", "num_pool_per_axis", "pool_op_kernel_sizes",
                       "conv_kernel_sizes", "unet_max_num_features"):  # fmt: skip
            config.pop(legacy, None)
        config["architecture"] = spec.to_nnunet_architecture()
    net = load_real_state_dict(build_network(spec), {k: v.detach().cpu() for k, v in state.items()})
    weights = {k: v.detach().clone() for k, v in net.state_dict().items()}  # full, aliases included
    logging: dict[str, list[Any]] = {k: [] for k in LOGGING_KEYS}
    logging.update({k: _plain(list(v)) for k, v in (history or {}).items()})
    ema = [v for v in logging.get("ema_fg_dice", []) if isinstance(v, (int, float))]
    epoch = max((len(v) for v in logging.values()), default=0)
    checkpoint = {
        "network_weights": weights,
        "optimizer_state": None,  # not a resumable training state: fine-tune with -pretrained_weights
        "grad_scaler_state": None,
        "logging": logging,
        "_best_ema": max(ema) if ema else None,
        "current_epoch": epoch,
        "init_args": {
            "plans": copy.deepcopy(plans_out),
            "configuration": configuration,
            "fold": fold,
            "dataset_json": copy.deepcopy(dict(dataset_json)),
            "device": torch.device("cpu"),
        },
        "trainer_name": trainer_name,
        "inference_allowed_mirroring_axes": tuple(int(a) for a in mirror_axes)
        if mirror_axes is not None
        else None,
        "weightzoo": {"spec": spec.to_dict(), "arch_hash": spec.hash(), **_plain(dict(info or {}))},
    }
    buf = io.BytesIO()
    torch.save(checkpoint, buf)
    atomic_write_json(out / "plans.json", plans_out)
    atomic_write_json(out / "dataset.json", dict(dataset_json))
    atomic_write_bytes(ckpt_path, buf.getvalue())
    return ckpt_path
