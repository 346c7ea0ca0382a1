"""Base networks and deltas: fine-tunes of ONE shared base stay in one weight-space basin.

Runs trained from different random inits end in different basins (their midpoint scores Dice 0.00),
so everything that averages, merges or generates weights works on fine-tunes of a shared base and
on their **deltas** θ − θ_base.

* A **base** is an ordinary model folder (`weightzoo base train`, or any `weightzoo train` output):
  one multi-task network, usually trained on all sites. Its id is the sha256 of its weights file
  (first 16 hex digits), so a zoo stores it once and a changed base can never be mistaken for it.
* A fine-tune for a task subset starts from the base **restricted** to those tasks: seg-layer output
  row k of the run is the base's row for `tasks[k]` (one sigmoid channel per task), the body is the
  base's body.
* `trainable` names the subset a fine-tune may change (a zoo grid axis, a TrainConfig key):

    all       every parameter
    decoder   decoder stages, transposed convolutions and seg layers (the encoder stays the base's)
    norm_seg  instance-norm affine parameters and seg layers only (~0.3 % of the small U-Net)

* A zoo stores a fine-tune's checkpoint as a delta (`split_delta`): tensors equal to the base are
  not stored at all, changed tensors as `DELTA_PREFIX + name` = θ − θ_base in float32, and a tensor
  whose float32 delta would not give back θ bit for bit (rare: cancellation far from the base) is
  stored whole. `join_delta` is the exact inverse.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load

from weightzoo.errors import InputError, ModelError
from weightzoo.nets.unet import (
    ArchSpec,
    build_network,
    check_state_dict,
    load_real_state_dict,
    require_2d,
    require_plain_unet,
)
from weightzoo.train.config import TRAINABLE

SUBSETS = TRAINABLE
DELTA_PREFIX = "delta::"
SEG_PREFIX = "decoder.seg_layers."


def is_trainable(name: str, subset: str) -> bool:
    """Does a fine-tune with `trainable: subset` change parameter `name` (a real state-dict key)?"""
    if subset == "all":
        return True
    if subset == "decoder":
        return name.startswith("decoder.")
    if subset == "norm_seg":
        return name.startswith(SEG_PREFIX) or ".norm." in name
    raise InputError(f"unknown trainable subset '{subset}'", f"choose one of: {', '.join(SUBSETS)}")


def freeze(net: torch.nn.Module, subset: str) -> int:
    """Set requires_grad False on every parameter outside `subset`; returns the trainable count."""
    n = 0
    for name, p in net.named_parameters():
        p.requires_grad_(is_trainable(name, subset))
        n += p.numel() if p.requires_grad else 0
    return n


@dataclass(frozen=True)
class BaseNet:
    """A base network: its architecture, weights (real state dict), tasks and where it came from."""

    base_id: str  # sha256 of the weights file, 16 hex digits
    spec: ArchSpec
    state: dict[str, torch.Tensor]
    tasks: tuple[str, ...]  # output channel k = tasks[k]
    meta: dict[str, Any]  # the folder's model.json
    weights: bytes  # the safetensors file as read (what a zoo stores)

    def restricted(self, tasks: Sequence[str]) -> tuple[ArchSpec, dict[str, torch.Tensor]]:
        """The base as a network with outputs `tasks` (a subset of its own, any order)."""
        return self.spec.with_classes(len(tasks)), restrict_to_tasks(self.state, self.tasks, tasks)

    @property
    def preprocessing(self) -> dict[str, Any]:
        return dict(self.meta.get("preprocessing", {}))


def restrict_to_tasks(
    state: Mapping[str, torch.Tensor], have: Sequence[str], want: Sequence[str]
) -> dict[str, torch.Tensor]:
    """`state` of a network with outputs `have`, with its seg-layer rows picked for outputs `want`."""
    missing = [t for t in want if t not in have]
    if missing:
        raise InputError(
            f"task(s) {missing} are not outputs of the base (it has {list(have)})",
            "fine-tune on the base's tasks, or train a base that has these tasks",
        )
    rows = torch.tensor([list(have).index(t) for t in want])
    return {k: (v.index_select(0, rows) if k.startswith(SEG_PREFIX) else v) for k, v in state.items()}


def base_id_of(weights: bytes) -> str:
    return hashlib.sha256(weights).hexdigest()[:16]


def load_base(folder: str | Path) -> BaseNet:
    """A model folder as a BaseNet (clear errors for a missing folder or broken weights)."""
    from weightzoo.segmenter import MODEL_WEIGHTS, read_model_json

    folder = Path(folder)
    meta = read_model_json(folder)
    require_plain_unet(ArchSpec.from_dict(meta["arch"], folder), "a base", folder)
    require_2d(ArchSpec.from_dict(meta["arch"], folder), "a base", folder)
    wpath = folder / MODEL_WEIGHTS
    try:
        weights = wpath.read_bytes()
    except OSError as e:
        raise ModelError(
            f"cannot read the base's weights ({e})", "re-run `weightzoo base train`", wpath
        ) from None
    return base_from_bytes(weights, meta, str(wpath), str(folder / "model.json"))


def base_from_bytes(
    weights: bytes, meta: dict[str, Any], source: str = "base", meta_source: str | None = None
) -> BaseNet:
    """A BaseNet from its safetensors bytes and model.json (how a zoo keeps it). Errors in the
    weights name `source`; errors in the description name `meta_source` (default: `source`)."""
    spec = ArchSpec.from_dict(meta["arch"], meta_source or source)
    try:
        loaded = safetensors_load(weights)  # key order is not stable across processes: sort it
        state = {k: loaded[k].float() for k in sorted(loaded)}
    except SafetensorError as e:
        raise ModelError(
            f"cannot parse the base's weights ({e})", "re-run `weightzoo base train`", source
        ) from None
    check_state_dict(spec, state, source, spec_from=Path(meta_source).name if meta_source else None)
    return BaseNet(base_id_of(weights), spec, state, tuple(meta["tasks"]), dict(meta), weights)


def split_delta(
    state: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """What a zoo stores for `state`, a fine-tune of `base` (see the module docstring)."""
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        v = v.detach().float().cpu()
        b = base[k]
        if torch.equal(v, b):
            continue
        d = v - b
        if torch.equal(b + d, v):
            out[DELTA_PREFIX + k] = d
        else:
            out[k] = v
    return out


def join_delta(
    stored: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The state `split_delta` was given, bit for bit."""
    out = {k: v.clone() for k, v in base.items()}
    for k, v in stored.items():
        if k.startswith(DELTA_PREFIX):
            name = k[len(DELTA_PREFIX) :]
            out[name] = base[name] + v.float()
        else:
            out[k] = v
    return out


def start_network(
    spec: ArchSpec, seed: int, base: BaseNet | None, tasks: Sequence[str], subset: str
) -> torch.nn.Module:
    """A run's starting network: the base restricted to `tasks` with only `subset` trainable, or a
    random init from `seed` (no base)."""
    if base is None:
        return build_network(spec, seed=seed)
    net = load_real_state_dict(build_network(spec), restrict_to_tasks(base.state, base.tasks, tasks))
    freeze(net, subset)
    return net
