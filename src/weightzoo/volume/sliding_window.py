"""nnU-Net v2's sliding-window prediction (`nnUNetPredictor.predict_sliding_window_return_logits`, 2.8.1).

Contract: `predict_sliding_window(net, data [C, *spatial] float32, patch_size, device, mirror_axes)`
returns the network's logits [K, *spatial] as nnU-Net accumulates them: float16 on `results_device`
(default: `device`, nnU-Net's perform_everything_on_device; pass cpu for its CPU fallback).

* `spatial` is 3-D ([z, y, x] after preprocessing). A 3-D patch tiles it in 3-D; a 2-D patch runs a
  2-D network slice by slice along the first axis, each slice tiled in 2-D (nnU-Net's 2-D predictor).
* Inputs smaller than the patch are zero-padded, centred (acvl_utils' `pad_nd_image`), then cropped back.
* Tiles start at `compute_steps_for_sliding_window` positions (step 0.5 of the patch); each tile's
  logits are multiplied by a Gaussian importance map (sigma = patch/8, scaled to a maximum of 10, zeros
  replaced by its minimum, in float16) and summed in float16, as are the weights; the sum is divided by
  the weights at the end.
* Mirroring TTA: the mean of the plain prediction and the prediction of every non-empty combination of
  flipped `mirror_axes` (axes of the patch, 0 = first spatial axis), flipped back, in nnU-Net's order.
* On CUDA the network runs under autocast, as nnU-Net's predictor does.

Why not MONAI's `sliding_window_inference`: its tile positions (floor of patch*(1-overlap), last tile
clamped), its Gaussian (`compute_importance_map`, normalised differently, no x10 scaling) and its float32
accumulation all differ from nnU-Net's, so its results would not match nnU-Net's bit for bit. The logic
is small, so it is written out here.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from contextlib import nullcontext
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter


def compute_steps_for_sliding_window(
    image_size: Sequence[int], tile_size: Sequence[int], tile_step_size: float = 0.5
) -> list[list[int]]:
    """nnU-Net's tile start positions per axis: as few steps of at most tile*step as cover the axis,
    spread evenly from 0 to size - tile (rounded)."""
    if not 0 < tile_step_size <= 1:
        raise ValueError("tile_step_size must be in (0, 1]")
    target = [i * tile_step_size for i in tile_size]
    num_steps = [int(np.ceil((i - k) / j)) + 1 for i, j, k in zip(image_size, target, tile_size, strict=True)]
    steps = []
    for dim in range(len(tile_size)):
        max_step = image_size[dim] - tile_size[dim]
        actual = max_step / (num_steps[dim] - 1) if num_steps[dim] > 1 else 99999999999
        steps.append([int(np.round(actual * i)) for i in range(num_steps[dim])])
    return steps


@lru_cache(maxsize=4)
def _gaussian_np(tile_size: tuple[int, ...], sigma_scale: float, value_scaling_factor: float) -> np.ndarray:
    tmp = np.zeros(tile_size)
    tmp[tuple(i // 2 for i in tile_size)] = 1
    g = gaussian_filter(tmp, [i * sigma_scale for i in tile_size], 0, mode="constant", cval=0)
    g /= np.max(g) / value_scaling_factor
    return g


def compute_gaussian(
    tile_size: Sequence[int],
    sigma_scale: float = 1.0 / 8,
    value_scaling_factor: float = 10,
    dtype: torch.dtype = torch.float16,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """nnU-Net's `compute_gaussian` [*tile_size]: a centred Gaussian (float64), max scaled to
    `value_scaling_factor`, cast to `dtype`; zeros (float16 underflow) set to the smallest non-zero value."""
    g = torch.from_numpy(_gaussian_np(tuple(int(t) for t in tile_size), sigma_scale, value_scaling_factor))
    g = g.to(device=device, dtype=dtype)
    mask = g == 0
    g[mask] = torch.min(g[~mask])
    return g


def pad_to_patch(data: torch.Tensor, patch_size: Sequence[int]) -> tuple[torch.Tensor, tuple[slice, ...]]:
    """acvl_utils' `pad_nd_image(data, patch_size, "constant", {"value": 0}, return_slicer=True)`: the last
    len(patch_size) axes padded with zeros up to the patch (content centred, the odd voxel above);
    returns (padded, slicer that crops it back)."""
    old = np.array(data.shape)
    new = np.array([*data.shape[: data.ndim - len(patch_size)], *patch_size])
    new = np.maximum(new, old)
    below, above = (new - old) // 2, (new - old) // 2 + (new - old) % 2
    slicer = tuple(slice(int(b), int(n - a)) for b, n, a in zip(below, new, above, strict=True))
    if not (below.any() or above.any()):
        return data, slicer
    pads = [int(v) for b, a in zip(below[::-1], above[::-1], strict=True) for v in (b, a)]
    return F.pad(data, pads, "constant", value=0), slicer


def sliding_window_slicers(
    image_size: Sequence[int], patch_size: Sequence[int], step: float = 0.5
) -> list[tuple]:
    """Index tuples into [C, *image_size] for every tile, in nnU-Net's order (2-D patches: per slice)."""
    if len(patch_size) == len(image_size) - 1:  # 2-D network on a volume: slice d, then in-plane tiles
        steps = compute_steps_for_sliding_window(image_size[1:], patch_size, step)
        return [
            (slice(None), d, *[slice(s, s + t) for s, t in zip((sx, sy), patch_size, strict=True)])
            for d in range(image_size[0])
            for sx in steps[0]
            for sy in steps[1]
        ]
    steps = compute_steps_for_sliding_window(image_size, patch_size, step)
    return [
        (slice(None), *[slice(s, s + t) for s, t in zip(start, patch_size, strict=True)])
        for start in itertools.product(*steps)
    ]


def mirror_and_predict(
    net: torch.nn.Module, x: torch.Tensor, mirror_axes: Sequence[int] | None
) -> torch.Tensor:
    """nnU-Net's `_internal_maybe_mirror_and_predict`: x [B, C, *patch] -> mean logits over the plain
    and every mirrored prediction (combinations of 1, 2, ... axes, in itertools order)."""
    prediction = net(x)
    if mirror_axes:
        if max(mirror_axes) > x.ndim - 3:
            raise ValueError(f"mirror axes {list(mirror_axes)} do not fit a {x.ndim - 2}-D patch")
        axes = [m + 2 for m in mirror_axes]
        combos = [c for i in range(len(axes)) for c in itertools.combinations(axes, i + 1)]
        for flip in combos:
            prediction += torch.flip(net(torch.flip(x, flip)), flip)
        prediction /= len(combos) + 1
    return prediction


@torch.inference_mode()
def predict_sliding_window(
    net: torch.nn.Module,
    data: torch.Tensor | np.ndarray,
    patch_size: Sequence[int],
    device: torch.device | str,
    mirror_axes: Sequence[int] | None = None,
    step_size: float = 0.5,
    use_gaussian: bool = True,
    results_device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float16,
) -> torch.Tensor:
    """Logits [K, *spatial] (on `results_device`, default `device`) for data [C, *spatial].

    `dtype`: of the Gaussian and the sums. nnU-Net's float16 is the default (bit-exact results); it
    loses precision where the Gaussian is tiny (near patch corners, ~1e-7 there: a voxel covered only by
    tile corners keeps few bits). torch.float32 gives the weighted average at float32 precision."""
    device = torch.device(device)
    results_device = torch.device(results_device) if results_device is not None else device
    data = torch.as_tensor(data)
    if data.ndim != 4:
        raise ValueError(f"data must be [C, z, y, x], got shape {tuple(data.shape)}")
    net = net.to(device).eval()
    autocast = torch.autocast(device.type, enabled=True) if device.type == "cuda" else nullcontext()
    with autocast:
        data, revert = pad_to_patch(data, patch_size)
        data = data.to(results_device)
        slicers = sliding_window_slicers(data.shape[1:], patch_size, step_size)
        gaussian = (
            compute_gaussian(tuple(patch_size), 1.0 / 8, 10, dtype, results_device) if use_gaussian else 1
        )
        logits = weights = None
        for sl in slicers:
            tile = torch.clone(data[sl][None], memory_format=torch.contiguous_format).to(device)
            prediction = mirror_and_predict(net, tile, mirror_axes)[0].to(results_device)  # [K, *patch]
            if logits is None:  # nnU-Net preallocates with its label manager's head count
                logits = torch.zeros(
                    (prediction.shape[0], *data.shape[1:]), dtype=dtype, device=results_device
                )
                weights = torch.zeros(data.shape[1:], dtype=dtype, device=results_device)
            if use_gaussian:
                prediction *= gaussian
            logits[sl] += prediction
            weights[sl[1:]] += gaussian
        torch.div(logits, weights, out=logits)
        if torch.any(torch.isinf(logits)):
            raise RuntimeError(f"inf in the accumulated {dtype} logits (nnU-Net aborts here too)")
    return logits[(slice(None), *revert[1:])]
