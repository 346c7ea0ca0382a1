"""Prune a model folder, fine-tune it with one shared budget, and write a model folder again.

A pruned model is an ordinary model folder (route "prune"): unstructured methods store the network
with its pruned weights at exactly zero (safetensors; the mask is "the zeros", and fine-tuning keeps
them zero), structured methods store the smaller PlainConvUNet itself. model.json's `info.prune` holds
the recipe (method, target, seed, fine-tune budget) and the metrics of the original and pruned
networks (weightzoo.prune.metrics), so a result can be re-made and compared.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from weightzoo.data.slices import SliceSet
from weightzoo.errors import InputError, ModelError, UnknownNameError
from weightzoo.nets.unet import build_network, load_real_state_dict, real_state_dict
from weightzoo.prune.metrics import measure, paired_latency
from weightzoo.prune.strategies import STRATEGIES, apply_masks, gradients
from weightzoo.prune.structured import CHANNEL_STRATEGIES, prune_channels, widths_for_speedup
from weightzoo.segmenter import NetSegmenter, save_model
from weightzoo.train.losses import DiceBCELoss

METHODS = (*STRATEGIES, *CHANNEL_STRATEGIES)


@dataclass(frozen=True)
class PruneRecipe:
    """What to prune and how to fine-tune; stored in model.json as `info.prune.recipe`."""

    method: str
    ratio: float | None = None  # unstructured: all parameters / nonzero parameters
    speedup: float | None = None  # structured: original FLOPs / pruned FLOPs
    round_to: int = 8  # structured: stage widths are multiples of this
    seed: int = 0
    finetune_steps: int = 0
    optimizer: str = "adam"
    lr: float = 1e-3
    batch_size: int = 16
    augment: float = 1.0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise UnknownNameError("pruning method", self.method, list(METHODS))
        if self.structured:
            if self.speedup is None or self.ratio is not None:
                raise InputError(
                    f"method {self.method} removes channels", "give --speedup (e.g. 2), not --ratio"
                )
            if self.round_to < 1:
                raise InputError(f"--round-to {self.round_to} is not ≥ 1", "give e.g. --round-to 8")
        elif self.ratio is None or self.speedup is not None:
            raise InputError(f"method {self.method} masks weights", "give --ratio (e.g. 8), not --speedup")
        if self.finetune_steps < 0:
            raise InputError(f"--finetune-steps {self.finetune_steps} is negative", "give 0 or more steps")

    @property
    def structured(self) -> bool:
        return self.method in CHANNEL_STRATEGIES

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def input_shape(seg: NetSegmenter, batch: int = 1) -> tuple[int, ...]:
    """[batch, C, H, W] of the model's preprocessed input: what its FLOPs and latency are measured on."""
    return (batch, seg.spec.input_channels, *seg.preprocessing.size)


def gradient_batch(train: SliceSet, seed: int, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed, seeded batch of training slices (foreground slices first) for gradient scores."""
    rng = np.random.default_rng(seed)
    fg = np.flatnonzero(train.labels.reshape(len(train), -1).any(1))
    rest = np.setdiff1d(np.arange(len(train)), fg)
    idx = np.concatenate([rng.permutation(fg), rng.permutation(rest)])[:size]
    return torch.from_numpy(train.images[idx]), torch.from_numpy(train.labels[idx]).float()


def cpu_copy(seg: NetSegmenter) -> torch.nn.Module:
    """A CPU copy of the segmenter's network (the segmenter itself is left where it is)."""
    state = {k: v.detach().cpu() for k, v in real_state_dict(seg.net).items()}
    return load_real_state_dict(build_network(seg.spec), state)


def prune_network(
    seg: NetSegmenter, recipe: PruneRecipe, train: SliceSet | None = None
) -> tuple[Any, torch.nn.Module]:
    """(spec, pruned copy of seg.net) on the CPU, before any fine-tuning. `train` is needed by the
    gradient strategies (one seeded batch)."""
    net = cpu_copy(seg)
    if recipe.structured:
        widths, _ = widths_for_speedup(seg.spec, float(recipe.speedup), input_shape(seg), recipe.round_to)
        return prune_channels(seg.spec, net, widths, CHANNEL_STRATEGIES[recipe.method](recipe.seed))
    strategy = STRATEGIES[recipe.method](recipe.seed)
    grads = None
    if strategy.needs_gradients:
        if train is None:
            raise InputError(f"method {recipe.method} scores weights by their gradient", "give --dataset")
        x, y = gradient_batch(train, recipe.seed)
        loss_fn = DiceBCELoss()
        grads = gradients(net, lambda n: loss_fn(n(x), y))
    return seg.spec, apply_masks(net, strategy.masks(net, float(recipe.ratio), grads))


LATENCY_BATCH = 16  # slices per timed forward pass: segment runs slices in batches


def prune_info(
    recipe: PruneRecipe, original: NetSegmenter, pruned: torch.nn.Module, timing: bool = True
) -> dict[str, Any]:
    """model.json `info.prune`: the recipe and the metrics of the original and the pruned net
    (FLOPs per slice; latency, on this machine's CPU, of a batch of LATENCY_BATCH slices)."""
    shape, reference = input_shape(original), cpu_copy(original)
    before = measure(reference, shape)
    after = measure(pruned.cpu(), shape, reference_flops=before["flops"])
    after["compression"] = before["size"] / max(after["nonzero_size"], 1)  # against the ORIGINAL's size
    if timing:  # original and pruned timed alternately: see paired_latency
        before["latency_s"], after["latency_s"], after["measured_speedup"] = paired_latency(
            reference, pruned, input_shape(original, LATENCY_BATCH)
        )
    return {
        "recipe": recipe.to_dict(),
        "from_model": original.name,
        "input_shape": list(shape),
        "latency_batch": LATENCY_BATCH if timing else None,
        "threads": torch.get_num_threads(),
        "original": before,
        "pruned": after,
    }


def save_pruned(
    out: str | Path, original: NetSegmenter, spec: Any, net: torch.nn.Module, info: dict[str, Any]
) -> Path:
    """Write a pruned network (no fine-tuning) as a model folder, route "prune"."""
    return save_model(
        out,
        net,
        spec,
        original.tasks,
        original.preprocessing,
        original.seconds_to_build,
        "prune",
        {"prune": info},
    )


def _refuse_other_model(out: Path, recipe: PruneRecipe) -> None:
    """Never overwrite a folder holding another model (the same recipe is re-written identically)."""
    from weightzoo.segmenter import MODEL_JSON, read_model_json

    if (out / MODEL_JSON).exists():
        held = read_model_json(out).get("info", {}).get("prune", {}).get("recipe")
        if held != recipe.to_dict():
            raise ModelError("the folder holds another model", "use another --out, or delete it first", out)


def finetune_config(seg: NetSegmenter, recipe: PruneRecipe, device: str = "auto") -> Any:
    """The TrainConfig of a pruned network's fine-tune: the model's preprocessing, the recipe's budget."""
    from weightzoo.train.config import TrainConfig

    prep = seg.preprocessing
    dropout = (seg.spec.arch_kwargs.get("dropout_op_kwargs") or {}).get("p", 0.0)
    return TrainConfig(
        tasks=list(seg.tasks),
        steps=recipe.finetune_steps,
        batch_size=recipe.batch_size,
        optimizer=recipe.optimizer,
        lr=recipe.lr,
        augment=recipe.augment,
        seed=recipe.seed,
        device=device,
        dropout=float(dropout or 0.0),
        size=prep.size,
        normalization=prep.normalization,
        axis=prep.axis,
        val_every=max(1, recipe.finetune_steps),
        checkpoint_every=50,
    )


def prune_and_finetune(
    seg: NetSegmenter,
    recipe: PruneRecipe,
    out: str | Path,
    train: SliceSet | None = None,
    val: SliceSet | None = None,
    device: str = "auto",
    progress: bool = True,
    timing: bool = True,
    data_info: dict[str, Any] | None = None,
    pruned: tuple[Any, torch.nn.Module] | None = None,
) -> tuple[NetSegmenter, dict[str, Any]]:
    """Prune `seg`, fine-tune it for recipe.finetune_steps on `train` (masks kept at zero), and write
    the model folder `out`. Resumable: re-running the same call continues a killed fine-tune.
    `pruned`: the (spec, network) `prune_network` already gave for this recipe, so it is not redone."""
    from weightzoo.segmenter import load_model
    from weightzoo.train.loop import StartFrom, train_on_slices

    if recipe.finetune_steps and train is None:
        raise InputError(f"--finetune-steps {recipe.finetune_steps} needs training data", "give --dataset")
    spec, net = pruned if pruned is not None else prune_network(seg, recipe, train)
    info = prune_info(recipe, seg, net, timing)
    if not recipe.finetune_steps:
        _refuse_other_model(Path(out), recipe)
        save_pruned(out, seg, spec, net, info)
        return load_model(out, device), info
    state = {k: v.detach().cpu().clone() for k, v in real_state_dict(net).items()}
    result = train_on_slices(
        train,
        val,
        finetune_config(seg, recipe, device),
        out,
        progress=progress,
        info={**(data_info or {}), "prune": info},
        start=StartFrom(spec, state, keep_zero=not recipe.structured),
        route="prune",
    )
    return result.segmenter, info
