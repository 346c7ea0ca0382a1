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
  Measured speedup: the two networks timed alternately (`paired_latency`).
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
def paired_latency(
    a: nn.Module, b: nn.Module, input_shape: tuple[int, ...], repeats: int = 30, warmup: int = 3
) -> tuple[float, float, float]:
    """(median latency of a, of b, median of the per-pair ratios a/b), timing a and b alternately on
    the same input: a burst of load on a shared machine then slows both of a pair, not one network's
    whole series, so the ratio (the measured speedup) stays honest."""
    p = next(a.parameters())
    x = torch.randn(input_shape, dtype=p.dtype, device=p.device)
    sync = torch.cuda.synchronize if p.device.type == "cuda" else (lambda: None)
    modes = (a.training, b.training)
    a.eval(), b.eval()
    ta, tb = [], []
    for i in range(warmup + repeats):
        times = []
        for net in (a, b) if i % 2 == 0 else (b, a):
            sync()
            t0 = time.perf_counter()
            net(x)
            sync()
            times.append(time.perf_counter() - t0)
        if i >= warmup:
            first, second = times
            ta.append(first if i % 2 == 0 else second)
            tb.append(second if i % 2 == 0 else first)
    a.train(modes[0]), b.train(modes[1])
    ratios = [x / y for x, y in zip(ta, tb, strict=True)]
    return statistics.median(ta), statistics.median(tb), statistics.median(ratios)


def measure(
    net: nn.Module, input_shape: tuple[int, ...], reference_flops: float | None = None
) -> dict[str, Any]:
    """Sizes, FLOPs per `input_shape`, and the theoretical speedup against `reference_flops`
    (default: this net's dense FLOPs). Latency: `paired_latency`."""
    out: dict[str, Any] = {**sizes(net), **flops(net, input_shape)}
    ref = reference_flops if reference_flops is not None else out["flops"]
    out["theoretical_speedup"] = ref / max(out["nonzero_flops"], 1.0)
    return out
