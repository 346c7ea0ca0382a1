"""Resumable training checkpoints: weights, optimizer state and RNG states in one safetensors file.

checkpoint_latest.safetensors holds tensors `model.*` (the network's real_state_dict), `optim.<param
index>.<name>` (e.g. SGD momentum buffers, Adam moments) and `rng.*` (torch CPU/CUDA, numpy); its
metadata key "checkpoint" holds the JSON state (step, run identity, history, optimizer scalars and
param groups, numpy/python RNG). One atomic file is therefore always self-consistent, wherever a kill
lands; checkpoint_latest.json, a readable copy of the state, is written after it.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes

from weightzoo.errors import ModelError
from weightzoo.fileio import atomic_write_bytes, atomic_write_json
from weightzoo.nets.unet import load_real_state_dict, real_state_dict

CKPT_WEIGHTS = "checkpoint_latest.safetensors"
CKPT_JSON = "checkpoint_latest.json"
CKPT_FORMAT = "weightzoo-train-checkpoint"


def _rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"rng.torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["rng.numpy_keys"] = torch.from_numpy(keys.astype(np.int64))
    py_version, py_state, py_gauss = random.getstate()
    meta = {
        "numpy": [kind, int(pos), int(has_gauss), float(cached)],
        "python": [py_version, list(py_state), py_gauss],
    }
    return tensors, meta


def _set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["rng.torch_cpu"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    kind, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, tensors["rng.numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))
    version, state, gauss = meta["python"]
    random.setstate((version, tuple(state), gauss))


def state_tensors(net: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """`model.*` (real_state_dict) and `optim.<param index>.<name>` tensors, on the CPU."""
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in real_state_dict(net).items()}
    for pid, pstate in optimizer.state_dict()["state"].items():
        for k, v in pstate.items():
            if torch.is_tensor(v):
                tensors[f"optim.{pid}.{k}"] = v.detach().cpu().contiguous()
    return tensors


def save_checkpoint(
    out_dir: Path,
    net: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    extra: dict[str, torch.Tensor] | None = None,
) -> None:
    """Atomically write weights + optimizer + RNG tensors (+ `extra`, e.g. other ranks' states) with
    `state` as metadata, then the JSON mirror."""
    tensors = state_tensors(net, optimizer)
    opt = optimizer.state_dict()
    scalars: dict[str, dict[str, Any]] = {}
    for pid, pstate in opt["state"].items():
        for k, v in pstate.items():
            if not torch.is_tensor(v):
                scalars.setdefault(str(pid), {})[k] = v
    rng_tensors, rng_meta = _rng_state()
    tensors.update(rng_tensors)
    tensors.update(extra or {})
    state = {**state, "optimizer": {"param_groups": opt["param_groups"], "scalars": scalars}, "rng": rng_meta}
    blob = json.dumps(state)
    atomic_write_bytes(out_dir / CKPT_WEIGHTS, safetensors_bytes(tensors, metadata={"checkpoint": blob}))
    atomic_write_json(out_dir / CKPT_JSON, state)


def read_checkpoint(out_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """(tensors, state) of out_dir's checkpoint, or None if there is none."""
    path = out_dir / CKPT_WEIGHTS
    if not path.exists():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            state = json.loads((f.metadata() or {})["checkpoint"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    except (SafetensorError, OSError, KeyError, ValueError) as e:
        raise ModelError(
            f"cannot read the training checkpoint ({e})", "delete it to restart the run from scratch", path
        ) from None
    if state.get("format") != CKPT_FORMAT:
        raise ModelError("not a weightzoo training checkpoint", "delete it or use another --out", path)
    return tensors, state


def restore_checkpoint(
    net: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    tensors: dict[str, torch.Tensor],
    state: dict[str, Any],
) -> None:
    """Put a checkpoint's weights, optimizer state and RNG states back (the run's config is checked
    by the caller: the optimizer must be the one the checkpoint was written from)."""
    load_real_state_dict(net, {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")})
    opt_state: dict[int, dict[str, Any]] = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, pid, name = k.split(".", 2)
            opt_state.setdefault(int(pid), {})[name] = v
    for pid, vals in state["optimizer"]["scalars"].items():
        opt_state.setdefault(int(pid), {}).update(vals)
    optimizer.load_state_dict({"state": opt_state, "param_groups": state["optimizer"]["param_groups"]})
    _set_rng_state(tensors, state["rng"])
