"""Unstructured pruning strategies, ShrinkBench-style: one small class each, overriding `score`.

The contract: `Strategy(seed).masks(net, ratio, grads)` returns {parameter name: 0/1 mask} for the
prunable weights so that the WHOLE network's compression (all parameters / nonzero parameters, the
ShrinkBench definition) is `ratio` — exactly, to the weight. Prunable weights are the convolution and
transposed-convolution kernels; norms, biases and the 1×1 output (seg) layers are kept, as
ShrinkBench keeps the classifier. The lowest-scoring weights are removed: over the whole network
(`layerwise = False`) or the same fraction of every layer (`layerwise = True`, the remainder spread
by largest remainders so the total is still exact).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable

import torch
from torch import nn

from weightzoo.errors import InputError


def prunable(net: nn.Module) -> dict[str, nn.Parameter]:
    """{name: weight} of the convolution kernels a strategy may prune (output layers excluded)."""
    return {n: p for n, p in net.named_parameters() if p.dim() > 2 and ".seg_layers." not in f".{n}"}


def weights_to_remove(net: nn.Module, ratio: float) -> int:
    """How many prunable weights must go so that all parameters / nonzero parameters = ratio."""
    total = sum(p.numel() for p in net.parameters())
    candidates = sum(p.numel() for p in prunable(net).values())
    if not math.isfinite(ratio) or ratio < 1:
        raise InputError(
            f"compression ratio {ratio} is not ≥ 1", "give e.g. --ratio 8 (8× fewer nonzero weights)"
        )
    n = total - round(total / ratio)
    if n > candidates:
        raise InputError(
            f"compression {ratio}× needs {n} of {total} weights removed; only {candidates} are prunable "
            f"(max {total / (total - candidates):.1f}×)",
            "ask for a smaller --ratio",
        )
    return n


def _lowest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of exactly the k lowest scores (ties broken by position: stable sort)."""
    keep = torch.ones(scores.numel(), dtype=torch.bool)
    if k > 0:
        keep[torch.sort(scores.flatten(), stable=True).indices[:k]] = False
    return keep.view_as(scores)


class Strategy(ABC):
    """Scores each prunable weight; the lowest scores are pruned. Subclasses define `score`."""

    name = "strategy"
    layerwise = False
    needs_gradients = False

    def __init__(self, seed: int = 0):
        self.seed = seed

    @abstractmethod
    def score(
        self, weight: torch.Tensor, grad: torch.Tensor | None, generator: torch.Generator
    ) -> torch.Tensor:
        """A score per element of `weight` (higher = keep)."""

    @torch.no_grad()
    def masks(
        self, net: nn.Module, ratio: float, grads: dict[str, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        params = prunable(net)
        if self.needs_gradients and not grads:
            raise InputError(f"strategy {self.name} needs gradients", "pass a batch (see gradients())")
        n = weights_to_remove(net, ratio)
        g = torch.Generator().manual_seed(self.seed)
        scores = {
            k: self.score(p.detach().cpu().float(), None if grads is None else grads[k].cpu().float(), g)
            for k, p in params.items()
        }
        if not self.layerwise:
            flat = torch.cat([s.flatten() for s in scores.values()])
            keep = _lowest(flat, n)
            out, i = {}, 0
            for k, s in scores.items():
                out[k] = keep[i : i + s.numel()].view_as(s).float()
                i += s.numel()
            return out
        # the same fraction of each layer; largest remainders make the total exactly n
        total = sum(s.numel() for s in scores.values())
        quotas = {k: n * s.numel() / total for k, s in scores.items()}
        counts = {k: math.floor(q) for k, q in quotas.items()}
        for k in sorted(quotas, key=lambda k: quotas[k] - counts[k], reverse=True)[
            : n - sum(counts.values())
        ]:
            counts[k] += 1
        return {k: _lowest(s, counts[k]).float() for k, s in scores.items()}


class GlobalMagnitude(Strategy):
    """|w|, ranked over the whole network (ShrinkBench GlobalMagWeight)."""

    name = "global-magnitude"

    def score(self, weight, grad, generator):
        return weight.abs()


class LayerMagnitude(GlobalMagnitude):
    """|w|, the same fraction of every layer (ShrinkBench LayerMagWeight)."""

    name = "layer-magnitude"
    layerwise = True


class GlobalGradient(Strategy):
    """|w · ∂L/∂w| on one training batch, ranked over the network (ShrinkBench GlobalMagGrad)."""

    name = "global-gradient"
    needs_gradients = True

    def score(self, weight, grad, generator):
        return (weight * grad).abs()


class LayerGradient(GlobalGradient):
    """|w · ∂L/∂w|, the same fraction of every layer (ShrinkBench LayerMagGrad)."""

    name = "layer-gradient"
    layerwise = True


class RandomPruning(Strategy):
    """Uniformly random weights (the sanity baseline every method must clearly beat)."""

    name = "random"

    def score(self, weight, grad, generator):
        return torch.rand(weight.shape, generator=generator)


STRATEGIES: dict[str, type[Strategy]] = {
    s.name: s for s in (GlobalMagnitude, LayerMagnitude, GlobalGradient, LayerGradient, RandomPruning)
}


def gradients(net: nn.Module, loss_of: Callable[[nn.Module], torch.Tensor]) -> dict[str, torch.Tensor]:
    """{prunable name: ∂loss/∂w} of one backward pass of `loss_of(net)` (net left with no grads)."""
    net.zero_grad(set_to_none=True)
    loss_of(net).backward()
    out = {k: p.grad.detach().clone() for k, p in prunable(net).items() if p.grad is not None}
    net.zero_grad(set_to_none=True)
    return out


@torch.no_grad()
def apply_masks(net: nn.Module, masks: dict[str, torch.Tensor]) -> nn.Module:
    """Zero the masked weights in place."""
    params = dict(net.named_parameters())
    for k, m in masks.items():
        params[k].mul_(m.to(params[k].device, params[k].dtype))
    return net
