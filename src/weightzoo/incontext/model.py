"""In-context segmentation network: UniverSeg's CrossBlock U-Net with Tyche's candidate set blocks.

Shapes used throughout (B = batch of queries, K = candidates, S = support entries):
  query stream    [B, K, C, H, W]   one feature map per candidate (input: image + own noise channel)
  support stream  [B, S, C, H, W]   one feature map per support entry (input: image + label)
  interaction     [B, K, S, C, H, W] every candidate against every support entry

`CrossConv2d` is the pairwise query-support convolution. Convolution is linear in its input
channels, so convolving the concatenation [query; support] equals W_q*query + W_s*support + b: the
split form convolves each candidate once and each support entry once and broadcast-adds, instead of
convolving all K·S concatenated pairs ("concatenate then convolve", kept as `forward_concat` for
tests and the benchmark). A `CrossBlock` averages the interaction over the support (so the support
is a set: order and duplicates-by-position do not matter) to update the query stream, and over the
candidates to update the support stream. A `SetBlock` lets the K candidates interact through their
mean at every level (Tyche), so they spread over plausible answers; `best_candidate_loss` trains
only the best of them per example.

Inference can process the support in chunks (`chunk=`): the per-level interaction tensor then
never exists for the whole support at once, which bounds peak memory by the support features.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from weightzoo.errors import ModelError

QUERY_IN = 2  # query image + one noise channel per candidate
SUPPORT_IN = 2  # support image + its binary label


def _act(x: torch.Tensor) -> torch.Tensor:
    return F.leaky_relu(x, 0.1)


class CrossConv2d(nn.Conv2d):
    """Pairwise convolution of every query (candidate) with every support entry, in split form.

    forward(query [B, K, Cq, H, W], support [B, S, Cs, H, W]) -> [B, K, S, C_out, H, W], equal to
    convolving the channel concatenation [query_k; support_s] of each pair with one Conv2d of
    Cq + Cs input channels (the first Cq weight channels act on the query). Cost: B·K + B·S
    convolutions of Cq resp. Cs channels instead of B·K·S of Cq + Cs channels.
    """

    def __init__(self, query_channels: int, support_channels: int, out_channels: int, kernel_size: int = 3):
        super().__init__(
            query_channels + support_channels, out_channels, kernel_size, padding=kernel_size // 2
        )
        self.query_channels = query_channels

    def _conv(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        lead = x.shape[:-3]
        y = F.conv2d(x.reshape(-1, *x.shape[-3:]), weight, bias, padding=self.padding)
        return y.view(*lead, *y.shape[-3:])

    def query_term(self, query: torch.Tensor) -> torch.Tensor:
        """[..., Cq, H, W] -> [..., C_out, H, W]: the query half of the weights, plus the bias."""
        return self._conv(query, self.weight[:, : self.query_channels], self.bias)

    def support_term(self, support: torch.Tensor) -> torch.Tensor:
        """[..., Cs, H, W] -> [..., C_out, H, W]: the support half of the weights (no bias)."""
        return self._conv(support, self.weight[:, self.query_channels :], None)

    def forward(self, query: torch.Tensor, support: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.query_term(query)[:, :, None] + self.support_term(support)[:, None]

    def forward_concat(self, query: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
        """Reference: build all K·S concatenated pairs, then convolve them. Same result as forward."""
        b, k, s = query.shape[0], query.shape[1], support.shape[1]
        q = query[:, :, None].expand(b, k, s, *query.shape[2:])
        sup = support[:, None].expand(b, k, s, *support.shape[2:])
        return self._conv(torch.cat([q, sup], dim=3), self.weight, self.bias)


class CrossBlock(nn.Module):
    """Query/support interaction at one level (UniverSeg), extended to K candidates.

    (q [B, K, Cq, H, W], s [B, S, Cs, H, W]) -> (q' [B, K, C, H, W], s' [B, S, C, H, W] or None):
    inter = act(CrossConv(q, s)); q' = act(conv(mean over S of inter)); s' = act(conv(mean over K
    of inter)). With K = 1 this is exactly UniverSeg's CrossBlock. `support_out=False` (the last
    decoder level) skips the support update nobody reads.
    """

    def __init__(self, cq: int, cs: int, c: int, support_out: bool = True):
        super().__init__()
        self.cross = CrossConv2d(cq, cs, c)
        self.conv_q = nn.Conv2d(c, c, 3, padding=1)
        self.conv_s = nn.Conv2d(c, c, 3, padding=1) if support_out else None

    def _per_item(self, conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
        return _act(conv(x.flatten(0, 1))).view(*x.shape[:2], -1, *x.shape[-2:])

    def forward(
        self, q: torch.Tensor, s: torch.Tensor, concat: bool = False, chunk: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if chunk is not None and not concat and not torch.is_grad_enabled():
            return self._forward_chunked(q, s, chunk)
        inter = _act(self.cross.forward_concat(q, s) if concat else self.cross(q, s))
        q_new = self._per_item(self.conv_q, inter.mean(2))
        s_new = self._per_item(self.conv_s, inter.mean(1)) if self.conv_s is not None else None
        return q_new, s_new

    def _forward_chunked(
        self, q: torch.Tensor, s: torch.Tensor, chunk: int
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Inference only: the same function, walking the support `chunk` entries at a time."""
        qt = self.cross.query_term(q)[:, :, None]  # [B, K, 1, C, H, W]
        acc = torch.zeros_like(qt[:, :, 0])
        s_out = None
        for j in range(0, s.shape[1], chunk):
            inter = _act(qt + self.cross.support_term(s[:, j : j + chunk])[:, None])  # [B, K, c, C, H, W]
            acc += inter.sum(2)
            if self.conv_s is not None:
                part = self._per_item(self.conv_s, inter.mean(1))
                if s_out is None:
                    s_out = part.new_empty(s.shape[0], s.shape[1], *part.shape[2:])
                s_out[:, j : j + chunk] = part
            del inter
        return self._per_item(self.conv_q, acc / s.shape[1]), s_out


class SetBlock(nn.Module):
    """Tyche's candidate interaction: q_k' = act(conv([q_k; mean_j q_j])), [B, K, C, H, W] -> same."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(2 * c, c, 3, padding=1)

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        x = torch.cat([q, q.mean(1, keepdim=True).expand_as(q)], dim=2)
        return _act(self.conv(x.flatten(0, 1))).view(q.shape)


@dataclass(frozen=True)
class InContextSpec:
    """Architecture of an InContextNet; stored in the model folder's config.json."""

    features: tuple[int, ...] = (16, 32, 32, 32)  # channels per level; one 2x pooling between levels
    size: int = 64  # training resolution (px); inputs are resized to size x size
    set_blocks: bool = True  # Tyche candidate interaction after every CrossBlock

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["features"] = list(self.features)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> InContextSpec:
        try:
            return cls(tuple(int(f) for f in d["features"]), int(d["size"]), bool(d.get("set_blocks", True)))
        except (KeyError, TypeError, ValueError) as e:
            raise ModelError(f"bad in-context model spec {d!r} ({e})", "re-create config.json") from None

    @property
    def size_divisor(self) -> int:
        return 2 ** (len(self.features) - 1)


class InContextNet(nn.Module):
    """CrossBlock U-Net over a query stream of K candidates and a support stream.

    forward(query [B, 1, H, W], support [B, S, 2, H, W] (image, label), candidates K, noise or
    generator) -> logits [B, K, H, W]. H and W must be multiples of `spec.size_divisor`; values are
    expected in 0..1 (see weightzoo.incontext.normalize_image).
    """

    def __init__(self, spec: InContextSpec | None = None):
        super().__init__()
        self.spec = spec or InContextSpec()
        f = list(self.spec.features)
        self.enc = nn.ModuleList()
        cq, cs = QUERY_IN, SUPPORT_IN
        for c in f:
            self.enc.append(CrossBlock(cq, cs, c))
            cq = cs = c
        self.dec = nn.ModuleList()
        for i in reversed(range(len(f) - 1)):
            self.dec.append(CrossBlock(f[i + 1] + f[i], f[i + 1] + f[i], f[i], support_out=i > 0))
        n_set = len(self.enc) + len(self.dec) if self.spec.set_blocks else 0
        set_ch = f + [f[i] for i in reversed(range(len(f) - 1))]
        self.sets = nn.ModuleList(SetBlock(c) for c in set_ch[:n_set])
        self.out = nn.Conv2d(f[0], 1, 1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, a=0.1, nonlinearity="leaky_relu")
                nn.init.zeros_(m.bias)

    def _set(self, i: int, q: torch.Tensor) -> torch.Tensor:
        return self.sets[i](q) if self.spec.set_blocks else q

    def forward(
        self,
        query: torch.Tensor,
        support: torch.Tensor,
        candidates: int = 1,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        concat: bool = False,
        chunk: int | None = None,
    ) -> torch.Tensor:
        b, _, h, w = query.shape
        if noise is None:
            noise = torch.randn(b, candidates, 1, h, w, generator=generator, device="cpu").to(query)
        q = torch.cat([query[:, None].expand(b, candidates, 1, h, w), noise], dim=2)
        s = support
        skips = []
        n_enc = len(self.enc)
        for i, block in enumerate(self.enc):
            q, s = block(q, s, concat, chunk)
            q = self._set(i, q)
            if i < n_enc - 1:
                skips.append((q, s))
                q, s = _pool(q), _pool(s)
        for j, block in enumerate(self.dec):
            q_skip, s_skip = skips.pop()
            q = torch.cat([_up(q), q_skip], dim=2)
            s = torch.cat([_up(s), s_skip], dim=2)
            q, s = block(q, s, concat, chunk)
            q = self._set(n_enc + j, q)
        return self.out(q.flatten(0, 1)).view(b, candidates, h, w)


def _pool(x: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(x.flatten(0, 1), 2).view(*x.shape[:3], x.shape[-2] // 2, x.shape[-1] // 2)


def _up(x: torch.Tensor) -> torch.Tensor:
    y = F.interpolate(x.flatten(0, 1), scale_factor=2, mode="bilinear", align_corners=False)
    return y.view(*x.shape[:3], *y.shape[-2:])


def soft_dice_bce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image soft Dice + BCE: logits [B, K, H, W], target [B, H, W] -> loss [B, K]."""
    t = target[:, None].expand_as(logits)
    p = torch.sigmoid(logits)
    inter = (p * t).sum((-2, -1))
    dice = (2 * inter + 1.0) / (p.sum((-2, -1)) + t.sum((-2, -1)) + 1.0)
    bce = F.binary_cross_entropy_with_logits(logits, t, reduction="none").mean((-2, -1))
    return (1 - dice) + bce


def best_candidate_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Tyche's loss: per example, only the best of the K candidates counts. -> scalar.

    logits [B, K, H, W], target [B, H, W]. With K = 1 this is the ordinary Dice + BCE loss.
    """
    return soft_dice_bce(logits, target).min(dim=1).values.mean()


def count_parameters(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())
