"""ShrinkBench's pruning metrics, made correct for U-Nets: sizes, FLOPs (2-D, 3-D and transposed
convolutions, padding counted), theoretical speedup and measured latency.

Conventions (those of `torch.utils.flop_counter`, which a test checks us against):
  FLOPs = 2 × multiply-accumulates of the convolutions; norms, activations and bias adds are not
  counted. A convolution computes every output position, padded borders included:
    Conv:           MACs = N · |out spatial| · C_out · (C_in / groups) · |kernel|
    ConvTranspose:  MACs = N · |in spatial|  · C_in  · (C_out / groups) · |kernel|
  Nonzero FLOPs count only the nonzero weights: |kernel| · C_out · C_in/groups becomes nnz(weight).
  Size = all parameters; nonzero size = nonzero parameters; compression = size / nonzero size.
  Theoretical speedup = dense FLOPs of the original / nonzero FLOPs of the pruned network.
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Any

import torch
from torch import nn

CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def sizes(net: nn.Module) -> dict[str, float]:
    """{size, nonzero_size, compression} over every parameter (each aliased module once)."""
    params = list(net.parameters())
    size = sum(p.numel() for p in params)
    nonzero = sum(int((p != 0).sum()) for p in params)
    return {"size": size, "nonzero_size": nonzero, "compression": size / max(nonzero, 1)}


@torch.no_grad()
def flops(net: nn.Module, input_shape: tuple[int, ...]) -> dict[str, float]:
    """{flops, nonzero_flops} of one forward pass on a zero input of `input_shape` [N, C, *spatial]."""
    total, nonzero = [0], [0]

    def hook(mod: nn.Module, inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        w = mod.weight
        per_position = (
            w.numel()
        )  # = C_out · C_in/groups · |kernel| (transposed: C_in · C_out/groups · |kernel|)
        if isinstance(mod, TRANSPOSED):
            x = inputs[0]
            positions = x.shape[0] * math.prod(x.shape[2:])  # N · |in spatial|
        else:
            positions = out.shape[0] * math.prod(out.shape[2:])  # N · |out spatial|
        total[0] += 2 * positions * per_position
        nonzero[0] += 2 * positions * int((w != 0).sum())

    handles = [m.register_forward_hook(hook) for m in net.modules() if isinstance(m, CONVS + TRANSPOSED)]
    was_training = net.training
    try:
        net.eval()
        p = next(net.parameters())
        net(torch.zeros(input_shape, dtype=p.dtype, device=p.device))
    finally:
        for h in handles:
            h.remove()
        net.train(was_training)
    return {"flops": float(total[0]), "nonzero_flops": float(nonzero[0])}


@torch.no_grad()
def latency(net: nn.Module, input_shape: tuple[int, ...], repeats: int = 20, warmup: int = 3) -> float:
    """Median seconds of one forward pass on `input_shape` (net's device; CUDA synchronised)."""
    p = next(net.parameters())
    x = torch.randn(input_shape, dtype=p.dtype, device=p.device)
    was_training = net.training
    net.eval()
    times = []
    sync = torch.cuda.synchronize if p.device.type == "cuda" else (lambda: None)
    for i in range(warmup + repeats):
        sync()
        t0 = time.perf_counter()
        net(x)
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    net.train(was_training)
    return statistics.median(times)


def measure(
    net: nn.Module,
    input_shape: tuple[int, ...],
    reference_flops: float | None = None,
    latency_shape: tuple[int, ...] | None = None,
) -> dict[str, Any]:
    """Sizes, FLOPs per `input_shape`, theoretical speedup against `reference_flops` (default: this
    net's dense FLOPs) and, given `latency_shape`, median forward latency on it in seconds."""
    out: dict[str, Any] = {**sizes(net), **flops(net, input_shape)}
    ref = reference_flops if reference_flops is not None else out["flops"]
    out["theoretical_speedup"] = ref / max(out["nonzero_flops"], 1.0)
    if latency_shape is not None:
        out["latency_s"] = latency(net, latency_shape)
    return out
