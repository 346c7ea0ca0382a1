"""The strong baseline for site heads: ONE site-conditioned network (FiLM on a learned site embedding).

Every encoder and decoder stage output of the PlainConvUNet is modulated per site,
`y = x · (1 + γ[site]) + β[site]` (Perez et al., FiLM, 2018), with γ, β rows of an embedding that
starts at zero (so training starts from the plain network). Row 0 is "unknown site": a fraction
`site_dropout` of the training samples are shown with row 0, which therefore learns a universal
modulation used for sites never seen. Cost per site: 2 × (sum of stage widths) parameters.

Training reuses the heads phase runner (site-balanced batches, nnU-Net recipe, resumable).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from weightzoo.data.slices import Preprocessing, SliceSet
from weightzoo.heads.phase import PhaseResult, SitePools, run_phase, site_balanced_indices
from weightzoo.heads.train import spec_for
from weightzoo.nets.unet import ArchSpec, build_network
from weightzoo.segmenter import NetSegmenter
from weightzoo.train.config import TrainConfig


class FiLMUNet(nn.Module):
    """forward(x [B, C, H, W], site: int or int tensor [B]) -> logits [B, K, H, W]; 0 = unknown site."""

    def __init__(self, net: nn.Module, spec: ArchSpec, sites: list[str]):
        super().__init__()
        self.net, self.sites = net, list(sites)
        feats = [int(f) for f in spec.arch_kwargs["features_per_stage"]]
        stages = [*net.encoder.stages, *net.decoder.stages]
        self.widths = feats + feats[-2::-1]  # encoder stages, then decoder stages (deepest first)
        self.offsets = [sum(self.widths[:i]) for i in range(len(self.widths))]
        self.total = sum(self.widths)
        self.film = nn.Embedding(len(self.sites) + 1, 2 * self.total)
        nn.init.zeros_(self.film.weight)
        self._cond: torch.Tensor | None = None
        for i, stage in enumerate(stages):
            stage.register_forward_hook(self._hook(i))

    def _hook(self, i: int) -> Any:
        def modulate(module: nn.Module, inputs: Any, out: torch.Tensor) -> torch.Tensor:
            assert self._cond is not None, "call FiLMUNet(x, site), not its inner network"
            o, c = self.offsets[i], self.widths[i]
            gamma = self._cond[:, o : o + c, None, None]
            beta = self._cond[:, self.total + o : self.total + o + c, None, None]
            return out * (1 + gamma) + beta

        return modulate

    def site_index(self, site: str | None) -> int:
        """Embedding row of a site: 1 + its position, 0 for None or a site not seen in training."""
        return 1 + self.sites.index(site) if site in self.sites else 0

    def forward(self, x: torch.Tensor, site: int | torch.Tensor) -> torch.Tensor:
        ids = torch.as_tensor(site, device=x.device, dtype=torch.long)
        if ids.ndim == 0:
            ids = ids.expand(len(x))
        self._cond = self.film(ids)
        try:
            return self.net(x)
        finally:
            self._cond = None

    def n_params_per_site(self) -> int:
        return 2 * self.total


class _AtSite(nn.Module):
    def __init__(self, model: FiLMUNet, index: int):
        super().__init__()
        self.model, self.index = model, index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x, self.index)


class FiLMSegmenter(NetSegmenter):
    """A Segmenter for one site of a FiLMUNet (unknown or None: the 'unknown site' row)."""

    def __init__(
        self,
        model: FiLMUNet,
        spec: ArchSpec,
        tasks: list[str],
        preprocessing: Preprocessing,
        site: str | None,
        device: Any = "cpu",
    ):
        super().__init__(
            _AtSite(model, model.site_index(site)),
            spec,
            tasks,
            preprocessing,
            name=f"film[{site}]",
            device=device,
        )


def train_film(
    train: SliceSet,
    val: SliceSet | None,
    cfg: TrainConfig,
    site_dropout: float = 0.1,
    run_dir: Path | None = None,
    progress: bool = False,
) -> tuple[FiLMUNet, PhaseResult]:
    """Train the site-conditioned network on all sites of `train` (site-balanced), cfg.steps steps.

    Validation (if `val`) runs with the unknown-site row. Returns (model, result).
    """
    spec = spec_for(cfg, train.images.shape[1])
    pools = SitePools.of(train)
    model = FiLMUNet(build_network(spec, seed=cfg.seed), spec, pools.sites)
    site_id = torch.tensor([model.site_index(m["site"]) for m in train.meta])

    def sampler(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        idx = site_balanced_indices(g, pools, cfg.batch_size, cfg.foreground_oversample)
        keep = torch.rand(len(idx), generator=g) >= site_dropout
        return idx, torch.where(keep, site_id[idx], 0)

    res = run_phase(
        model, train, sampler, cfg, "film", (0, val) if val is not None else None, run_dir, {}, progress
    )
    return model, res
