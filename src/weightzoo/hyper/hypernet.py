"""A small hypernetwork library: condition → weights for a declared set of primary-network parameters.

The contract (hyperlight's): the primary network's generated parameters are declared as a dict of
shapes, `{name: shape}`; `HyperNet(shapes, ...)(cond [B, d])` returns `{name: tensor [B, *shape]}`,
one weight set per sample.

Two parametrizations (Ortiz, Guttag & Dalca 2023, "Magnitude Invariant Parametrizations"):
  mip      the condition is encoded with a constant norm (each z ∈ [0, 1] → [cos(πz/2), sin(πz/2)],
           a one-hot code as is), and the weights are θ = θ₀ + Δθ(z): θ₀ is a free parameter
           initialised like the primary network, Δθ's output layer starts at zero, so at init every
           condition gets θ₀. Δθ's output is divided by the output layer's fan-in: with Adam every
           weight of that layer moves by about the learning rate per step, so unscaled, Δθ would move
           fan-in times faster than θ₀ (measured: at lr 1e-2 the unscaled hypernetwork trained far
           slower than a plain network; scaled, one learning rate serves both).
  default  the raw condition goes in and the output layer IS the weights (θ = W·h + b, PyTorch's
           default Linear init), the common design whose input magnitude leaks into the weights.

Output layers, so the hypernetwork does not grow as hidden × (number of generated weights) P:
  full     Linear(hidden → P)                                   hidden·P parameters
  lowrank  Linear(hidden → r) then Linear(r → P)                  (hidden + P)·r: Δθ in an r-dim subspace
  chunked  one Linear(hidden + e → C) shared by ⌈P/C⌉ chunks, each with a learned e-dim embedding
           (Ha et al. 2016)                                        (hidden + e)·C + ⌈P/C⌉·e
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from weightzoo.errors import ModelError

Shapes = Mapping[str, Sequence[int]]
OUTPUTS = ("full", "lowrank", "chunked")


# ---- condition encodings -----------------------------------------------------------------------------
class Encoding(nn.Module):
    """cond [B, d] -> features [B, out_dim]."""

    out_dim: int


class CosSinEncoding(Encoding):
    """MIP's encoding of continuous conditions in [0, 1]: z -> [cos(πz/2), sin(πz/2)] per dimension,
    so ‖encoding‖ = √d whatever z is."""

    def __init__(self, dims: int):
        super().__init__()
        self.out_dim = 2 * dims

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # [B, d] -> [B, 2d]
        a = z * (math.pi / 2)
        return torch.cat([torch.cos(a), torch.sin(a)], dim=-1)


class RawEncoding(Encoding):
    """The condition as it is (the default parametrization; one-hot codes have norm 1 anyway)."""

    def __init__(self, dims: int):
        super().__init__()
        self.out_dim = dims

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z


# ---- the hypernetwork --------------------------------------------------------------------------------
class HyperNet(nn.Module):
    """cond [B, d] -> {name: [B, *shape]} for the declared `shapes`.

    `theta0` (name -> tensor of that shape) is the primary network's initial weights: with
    `additive=True` (MIP) it becomes the free parameter θ₀ and Δθ starts at exactly zero; with
    `additive=False` the output layer produces the weights alone.
    """

    def __init__(
        self,
        shapes: Shapes,
        encoding: Encoding,
        theta0: Mapping[str, torch.Tensor] | None = None,
        hidden: Sequence[int] = (64, 64),
        output: str = "chunked",
        additive: bool = True,
        rank: int = 16,
        chunk: int = 512,
        chunk_embedding: int = 16,
    ):
        super().__init__()
        if output not in OUTPUTS:
            raise ModelError(f"unknown hypernetwork output {output!r}", f"use one of {', '.join(OUTPUTS)}")
        if additive and theta0 is None:
            raise ModelError(
                "an additive (MIP) hypernetwork needs theta0", "pass the primary network's weights"
            )
        self.names = list(shapes)
        self.shapes = {k: tuple(int(d) for d in v) for k, v in shapes.items()}
        self.sizes = [math.prod(self.shapes[k]) for k in self.names]
        self.n_out = sum(self.sizes)
        self.encoding, self.output, self.additive = encoding, output, additive
        layers: list[nn.Module] = []
        width = encoding.out_dim
        for h in hidden:
            layers += [nn.Linear(width, h), nn.LeakyReLU(0.01)]
            width = h
        self.mlp = nn.Sequential(*layers)
        if output == "full":
            self.head = nn.Linear(width, self.n_out)
            last = self.head
        elif output == "lowrank":
            self.down = nn.Linear(width, rank, bias=False)
            self.head = nn.Linear(rank, self.n_out)
            last = self.head
        else:
            self.chunk = chunk
            n_chunks = math.ceil(self.n_out / chunk)
            self.chunk_emb = nn.Parameter(torch.randn(n_chunks, chunk_embedding))
            self.head = nn.Linear(width + chunk_embedding, chunk)
            last = self.head
        self.out_scale = 1.0 / last.in_features if additive else 1.0
        if additive:  # Δθ = 0 at init: every condition starts at θ₀
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
            assert theta0 is not None
            flat = torch.cat([theta0[k].detach().reshape(-1).float() for k in self.names])
            self.theta0 = nn.Parameter(flat)
        else:
            self.register_parameter("theta0", None)

    def flat(self, cond: torch.Tensor) -> torch.Tensor:
        """cond [B, d] -> generated weights [B, P] (θ₀ + Δθ, or the output alone)."""
        h = self.mlp(self.encoding(cond.float()))  # [B, hidden]
        if self.output == "lowrank":
            h = self.down(h)  # [B, rank]
        elif self.output == "chunked":  # every chunk sees [h, e_c]: [B, n_chunks, hidden + e]
            n_chunks = self.chunk_emb.shape[0]
            h = torch.cat([h[:, None].expand(-1, n_chunks, -1), self.chunk_emb.expand(len(h), -1, -1)], -1)
        # the output scale is folded into the (small) layer, not applied to the (B x P) output
        w, b = self.head.weight, self.head.bias
        out = F.linear(h, w * self.out_scale, b * self.out_scale) if self.additive else F.linear(h, w, b)
        out = out.flatten(1)[:, : self.n_out]  # [B, P]
        return out + self.theta0 if self.additive else out

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """[B, P] -> {name: [B, *shape]}."""
        parts = torch.split(flat, self.sizes, dim=1)
        return {k: p.reshape(len(flat), *self.shapes[k]) for k, p in zip(self.names, parts, strict=True)}

    def forward(self, cond: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.unflatten(self.flat(cond))

    def n_hyper_params(self) -> int:
        """Parameters of the hypernetwork itself (θ₀ excluded)."""
        return sum(p.numel() for n, p in self.named_parameters() if n != "theta0")
