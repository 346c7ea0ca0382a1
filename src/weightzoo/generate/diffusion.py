"""A diffusion transformer over network parameters (G.pt-style, for segmentation U-Nets).

Vectors: a network's parameters in the generator's task layout (`weightzoo.generate.vectors`).
The start parameters are standardised per tensor with the zoo's statistics (mean 0, std 1 over the
zoo). The diffusion variable x0 is the UPDATE from start to target, per tensor divided by the typical
size of an update in the zoo's training pairs: parameters of different seeds differ far more than a
run's checkpoints differ from each other, so diffusing over the target itself would bury the update
(≈ 14 % of the variance in our phantom zoo) under noise of the zoo's full spread.

Tokens: each layer of `ParamLayout.layers` (conv, norm, transposed conv, seg) is flattened (its
tensors back to back) and cut into chunks of `chunk` values, zero-padded at the layer's end; a chunk
never spans two layers. Encoder/decoder: `encoder="shared"` (default) maps every chunk with ONE linear
layer and tells layers apart by a learned layer embedding plus a learned per-token embedding;
`encoder="per_layer"` gives each layer its own linear encoder and decoder (G.pt gives each layer
its own). Shared is the default because its size does not grow with the network (the small preset's
per-layer tables would hold ~30 encoder matrices) and all layers train one encoder, which matters
with a small zoo; `benchmarks/generate_eval.py` measures both.

Sequence (no causal mask; every token sees every other):
  [time] [site] [current metric, task k]xK [target metric, task k]xK [start chunks]xT [noisy chunks]xT
The time token is a sinusoidal embedding of the diffusion step; the site token is the mean embedding
of the run's sites (or a learned "any site" embedding); a metric token is a Fourier embedding of
the Dice value (or a learned "absent" vector when the network has no output for the task) plus the
task's embedding and its role (current / target). The noisy tokens' outputs are decoded into the
predicted (clean) update; the generated network is start + update (global residual): with the
decoder initialised at zero, an untrained generator returns its starting point.

Diffusion: x0 (clean-update) prediction, DDPM training with a cosine noise schedule over
`timesteps` steps, deterministic DDIM sampling with a few steps. `EMA` keeps the averaged weights
used for sampling.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch import nn

from weightzoo.errors import InputError, UnknownNameError
from weightzoo.zoo.params import ParamLayout

ENCODERS = ("shared", "per_layer")

# name -> model size. tiny: tests and the CPU demo; small: a GPU (or a patient CPU) on the small U-Net;
# default: a GPU on the default U-Net.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"d_model": 64, "n_layers": 2, "n_heads": 4, "chunk": 64, "ff_mult": 2},
    "small": {"d_model": 256, "n_layers": 6, "n_heads": 8, "chunk": 512, "ff_mult": 4},
    "default": {"d_model": 512, "n_layers": 12, "n_heads": 8, "chunk": 1024, "ff_mult": 4},
}


@dataclass
class DiffusionConfig:
    """The generator network and its noise schedule."""

    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    chunk: int = 64  # parameter values per token
    ff_mult: int = 2
    dropout: float = 0.0
    encoder: str = "shared"  # shared | per_layer
    timesteps: int = 1000
    fourier: int = 8  # frequencies of the metric embedding (π·2^k, k < fourier)

    def __post_init__(self) -> None:
        if self.encoder not in ENCODERS:
            raise UnknownNameError("encoder", self.encoder, ENCODERS)
        if self.d_model % self.n_heads:
            raise InputError(
                f"d_model {self.d_model} is not a multiple of n_heads {self.n_heads}", "fix the config"
            )
        if min(self.d_model, self.n_layers, self.chunk, self.timesteps) < 1:
            raise InputError("d_model, n_layers, chunk and timesteps must be >= 1", "fix the config")

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> DiffusionConfig:
        if name not in PRESETS:
            raise UnknownNameError("generator preset", name, list(PRESETS))
        return cls(**{**PRESETS[name], **overrides})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DiffusionConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


# ---- tokens -----------------------------------------------------------------------------------------
class Tokenizer:
    """Vectors [B, numel] <-> tokens [B, T, chunk]; chunks stay within one layer of the layout."""

    def __init__(self, layout: ParamLayout, chunk: int):
        self.chunk, self.numel = chunk, layout.numel
        by_name = {t.name: t for t in layout.tensors}
        gather, token_layer, ranges = [], [], []
        for li, layer in enumerate(layout.layers):
            idx = torch.cat(
                [torch.arange(by_name[n].offset, by_name[n].offset + by_name[n].numel) for n in layer.tensors]
            )
            n_tok = math.ceil(len(idx) / chunk)
            pad = torch.full((n_tok * chunk - len(idx),), self.numel, dtype=torch.long)  # -> a zero
            start = len(token_layer)
            gather.append(torch.cat([idx, pad]))
            token_layer += [li] * n_tok
            ranges.append((start, start + n_tok))
        self.gather = torch.cat(gather)  # [T * chunk], values in [0, numel]
        self.n_tokens = len(token_layer)
        self.n_layers = len(layout.layers)
        self.token_layer = torch.tensor(token_layer, dtype=torch.long)
        self.layer_ranges = ranges  # token range of each layer
        valid = self.gather < self.numel
        self.inverse = torch.empty(self.numel, dtype=torch.long)
        self.inverse[self.gather[valid]] = torch.nonzero(valid).squeeze(1)

    def tokens(self, vec: torch.Tensor) -> torch.Tensor:
        padded = torch.cat([vec, vec.new_zeros(*vec.shape[:-1], 1)], -1)
        return padded[..., self.gather.to(vec.device)].reshape(*vec.shape[:-1], self.n_tokens, self.chunk)

    def vector(self, tokens: torch.Tensor) -> torch.Tensor:
        flat = tokens.reshape(*tokens.shape[:-2], self.n_tokens * self.chunk)
        return flat[..., self.inverse.to(tokens.device)]


class GroupedLinear(nn.Module):
    """One linear map per group of consecutive tokens ([B, T, n_in] -> [B, T, n_out])."""

    def __init__(self, n_in: int, n_out: int, ranges: list[tuple[int, int]], zero: bool = False):
        super().__init__()
        self.ranges = ranges
        w = torch.empty(len(ranges), n_in, n_out)
        for g in range(len(ranges)):
            nn.init.xavier_uniform_(w[g].T)  # acts on [out, in] like nn.Linear's init
        self.weight = nn.Parameter(torch.zeros_like(w) if zero else w)
        self.bias = nn.Parameter(torch.zeros(len(ranges), n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.ranges) == 1:
            return x @ self.weight[0] + self.bias[0]
        return torch.cat(
            [x[:, a:b] @ self.weight[g] + self.bias[g] for g, (a, b) in enumerate(self.ranges)], 1
        )


def sinusoidal(t: torch.Tensor, dim: int) -> torch.Tensor:
    """[B] -> [B, dim] transformer-style embedding of (diffusion) time steps."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.sin(args), torch.cos(args)], -1)
    return torch.nn.functional.pad(emb, (0, dim - 2 * half))


# ---- the network ------------------------------------------------------------------------------------
class ParamDiffusion(nn.Module):
    """x0-predicting denoiser: (x_t, t, start, metrics, site) -> predicted clean update.

    Shapes: x_t (noisy scaled update), start (standardised parameters) [B, numel]; t [B] int64 in [0, timesteps); metric_current,
    metric_target [B, K] Dice in [0, 1] or NaN where the network has no output for task k;
    site_weights [B, S] (a run's sites, any positive weights; an all-zero row = "any site").
    Returns x0_hat [B, numel], the scaled update (the caller adds it to the start: global residual).
    """

    def __init__(self, layout: ParamLayout, n_tasks: int, n_sites: int, cfg: DiffusionConfig):
        super().__init__()
        self.cfg, self.n_tasks, self.n_sites = cfg, n_tasks, n_sites
        self.tok = Tokenizer(layout, cfg.chunk)
        d = cfg.d_model
        ranges = self.tok.layer_ranges if cfg.encoder == "per_layer" else [(0, self.tok.n_tokens)]
        self.enc_start = GroupedLinear(cfg.chunk, d, ranges)
        self.enc_noisy = GroupedLinear(cfg.chunk, d, ranges)
        self.dec = GroupedLinear(d, cfg.chunk, ranges, zero=True)
        self.layer_emb = nn.Embedding(self.tok.n_layers, d)
        self.token_emb = nn.Parameter(torch.randn(self.tok.n_tokens, d) * 0.02)
        self.role_emb = nn.Embedding(6, d)  # time, site, current, target, start, noisy
        self.time_mlp = nn.Sequential(nn.Linear(d, d), nn.SiLU(), nn.Linear(d, d))
        self.site_emb = nn.Embedding(n_sites + 1, d)  # row 0: any site
        self.task_emb = nn.Embedding(n_tasks, d)
        self.metric_mlp = nn.Sequential(nn.Linear(2 * cfg.fourier + 1, d), nn.SiLU(), nn.Linear(d, d))
        self.absent = nn.Parameter(torch.randn(2, d) * 0.02)  # current / target metric absent
        layer = nn.TransformerEncoderLayer(
            d, cfg.n_heads, cfg.ff_mult * d, cfg.dropout, activation="gelu", batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(layer, cfg.n_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.register_buffer(
            "freqs", math.pi * 2 ** torch.arange(cfg.fourier, dtype=torch.float32), persistent=False
        )

    def _metric_tokens(self, m: torch.Tensor, role: int) -> torch.Tensor:
        """[B, K] Dice (NaN: the network has no output for task k) -> [B, K, d]."""
        present = torch.isfinite(m)
        v = torch.where(present, m, torch.zeros_like(m)).clamp(0, 1)[..., None]  # [B, K, 1]
        feats = torch.cat([v, torch.sin(v * self.freqs), torch.cos(v * self.freqs)], -1)
        emb = torch.where(present[..., None], self.metric_mlp(feats), self.absent[role - 2])
        return emb + self.task_emb.weight[None] + self.role_emb.weight[role]

    def _site_token(self, w: torch.Tensor) -> torch.Tensor:
        total = w.sum(-1, keepdim=True)
        mean = (w / total.clamp_min(1e-8)) @ self.site_emb.weight[1:]
        return torch.where(total > 0, mean, self.site_emb.weight[0].expand_as(mean)) + self.role_emb.weight[1]

    def forward(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        start: torch.Tensor,
        metric_current: torch.Tensor,
        metric_target: torch.Tensor,
        site_weights: torch.Tensor,
    ) -> torch.Tensor:
        pos = self.layer_emb(self.tok.token_layer.to(x_t.device)) + self.token_emb
        s_tok = self.enc_start(self.tok.tokens(start)) + pos + self.role_emb.weight[4]
        n_tok = self.enc_noisy(self.tok.tokens(x_t)) + pos + self.role_emb.weight[5]
        time = self.time_mlp(sinusoidal(t, self.cfg.d_model)) + self.role_emb.weight[0]
        cond = [
            time[:, None],
            self._site_token(site_weights)[:, None],
            self._metric_tokens(metric_current, 2),
            self._metric_tokens(metric_target, 3),
        ]
        seq = torch.cat([*cond, s_tok, n_tok], 1)
        if x_t.device.type == "cpu" and not self.training:
            # PyTorch's fused inference path of nn.TransformerEncoder ran 2x slower than the plain
            # one on the CPU (small preset, 2,000 tokens): use the plain path there.
            prev = torch.backends.mha.get_fastpath_enabled()
            torch.backends.mha.set_fastpath_enabled(False)
            try:
                h = self.blocks(seq)
            finally:
                torch.backends.mha.set_fastpath_enabled(prev)
        else:
            h = self.blocks(seq)
        update = self.dec(self.norm(h[:, -self.tok.n_tokens :]))
        return self.tok.vector(update)


# ---- the noise schedule -----------------------------------------------------------------------------
def cosine_alpha_bar(timesteps: int, s: float = 0.008) -> torch.Tensor:
    """[timesteps] cumulative signal fraction ᾱ_t of the cosine schedule (Nichol & Dhariwal, 2021)."""
    x = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
    f = torch.cos((x + s) / (1 + s) * math.pi / 2) ** 2
    betas = (1 - f[1:] / f[:-1]).clamp(0, 0.999)
    return torch.cumprod(1 - betas, 0).float()


def q_sample(x0: torch.Tensor, t: torch.Tensor, alpha_bar: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(ᾱ_t)·x0 + sqrt(1-ᾱ_t)·ε."""
    a = alpha_bar.to(x0.device)[t][:, None]
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


@torch.no_grad()
def ddim_sample(
    model: ParamDiffusion,
    start: torch.Tensor,
    metric_current: torch.Tensor,
    metric_target: torch.Tensor,
    site_weights: torch.Tensor,
    steps: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Deterministic DDIM (η = 0) from pure noise in `steps` denoising steps; returns the predicted
    clean update x0 [B, numel].

    The noise is drawn on the CPU from `generator`, so a seed gives the same result on any device."""
    return ddim_loop(
        lambda x, t: model(x, t, start, metric_current, metric_target, site_weights),
        tuple(start.shape),
        start.device,
        model.cfg.timesteps,
        steps,
        generator,
    )


@torch.no_grad()
def ddim_loop(
    predict_x0: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    shape: tuple[int, ...],
    device: torch.device,
    timesteps: int,
    steps: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Deterministic DDIM (η = 0) of any x0-predicting model `predict_x0(x_t, t [B]) -> x0`, from
    noise drawn on the CPU from `generator` (same seed, same result on any device)."""
    alpha_bar = cosine_alpha_bar(timesteps).to(device)
    ts = torch.linspace(timesteps - 1, 0, max(1, steps)).round().long().tolist()
    x = torch.randn(shape, generator=generator).to(device)
    x0 = torch.zeros_like(x)
    for i, t in enumerate(ts):
        x0 = predict_x0(x, torch.full((shape[0],), t, dtype=torch.long, device=device))
        if i + 1 == len(ts):
            break
        a, a_next = alpha_bar[t], alpha_bar[ts[i + 1]]
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt().clamp_min(1e-8)
        x = a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps
    return x0


class EMA:
    """Exponential moving average of a model's parameters, with warm-up (decay grows from 0)."""

    def __init__(self, model: nn.Module, decay: float = 0.999):
        self.decay, self.n = decay, 0
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.n += 1
        d = min(self.decay, (1 + self.n) / (10 + self.n))
        for e, p in zip(self.model.parameters(), model.parameters(), strict=True):
            e.lerp_(p.detach(), 1 - d)
