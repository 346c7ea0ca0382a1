"""nnU-Net's 2-D training augmentation, batched in torch (runs on the batch's device), with one knob.

The transforms, their order, probabilities and ranges follow nnU-Net v2's default training pipeline
for 2-D: rotation (±180°) and scaling (0.7–1.4), Gaussian noise, Gaussian blur, multiplicative
brightness, contrast, simulated low resolution, gamma (on the inverted and the plain image), mirroring.
Elastic deformation is off, as in nnU-Net.

`strength` in [0, 1] multiplies every transform's probability: 1 is nnU-Net's recipe, 0 is off,
0.5 fires each transform half as often (magnitudes stay nnU-Net's). All randomness is drawn on the
CPU from the given `torch.Generator` in a fixed order, so a batch's augmentation depends only on the
generator's state (identical on CPU and GPU), never on the global RNG.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# transform -> nnU-Net v2 apply probability (per sample) at strength 1
PROBABILITIES: dict[str, float] = {
    "rotate": 0.2,
    "scale": 0.2,
    "noise": 0.1,
    "blur": 0.2,
    "brightness": 0.15,
    "contrast": 0.15,
    "lowres": 0.25,
    "gamma_inverted": 0.1,
    "gamma": 0.3,
    "mirror_w": 0.5,
    "mirror_h": 0.5,
}
_COL = {name: i for i, name in enumerate(PROBABILITIES)}
ROTATION = math.pi  # ± radians
SCALE = (0.7, 1.4)
NOISE_VARIANCE = (0.0, 0.1)
BLUR_SIGMA = (0.5, 1.0)
BLUR_RADIUS = math.ceil(3 * BLUR_SIGMA[1])  # kernel half-width covering 3 sigma of the widest blur
BRIGHTNESS = (0.75, 1.25)
CONTRAST = (0.75, 1.25)
LOWRES_ZOOM = (0.5, 1.0)
GAMMA = (0.7, 1.5)


def _uniform(u: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    return lo + (hi - lo) * u


def _below_or_above_one(choice: torch.Tensor, u: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """nnU-Net's `BGContrast`: half the time a factor in (lo, 1), else in (1, hi)."""
    return torch.where(choice < 0.5, _uniform(u, lo, 1.0), _uniform(u, 1.0, hi))


def _affine(angle: torch.Tensor, scale: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """[B, 2, 3] affine_grid matrices: sample input at scale·R·(output) in pixel units (square pixels).

    affine_grid works in [-1, 1] coordinates per axis, so a rotation is conjugated with the
    aspect ratio to stay a rotation on a non-square image.
    """
    cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
    zero = torch.zeros_like(cos)
    row0 = torch.stack([cos, -sin * h / w, zero], 1)
    row1 = torch.stack([sin * w / h, cos, zero], 1)
    return torch.stack([row0, row1], 1)


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur of [n, C, H, W] with one sigma per sample ([n])."""
    n, c, h, w = x.shape
    radius = BLUR_RADIUS  # fixed: a sample's blur must not depend on the other samples of its batch
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-0.5 * (t[None] / sigma.to(x)[:, None]) ** 2)
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(c, 0)  # [n*C, 2r+1]
    mode = "reflect" if min(h, w) > radius else "replicate"
    y = x.reshape(1, n * c, h, w)
    y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode=mode), k[:, None, None, :], groups=n * c)
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode=mode), k[:, None, :, None], groups=n * c)
    return y.reshape(n, c, h, w)


def _spatial(x: torch.Tensor) -> tuple[int, ...]:
    """The spatial dims of [n, C, *spatial]: (2, 3) for 2-D, (2, 3, 4) for 3-D."""
    return tuple(range(2, x.ndim))


def _per_channel(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """[n, C] -> [n, C, 1, ...] broadcastable against x [n, C, *spatial]."""
    return v.reshape(*v.shape, *([1] * (x.ndim - 2)))


def _gamma(x: torch.Tensor, gamma: torch.Tensor, invert: bool) -> torch.Tensor:
    """nnU-Net's gamma on [n, C, *spatial] with gamma [n, C]: rescale to [0, 1], power, restore mean/std."""
    if invert:
        x = -x
    d = _spatial(x)
    mean, std = x.mean(d, keepdim=True), x.std(d, keepdim=True)
    lo = x.amin(d, keepdim=True)
    rng = x.amax(d, keepdim=True) - lo + 1e-7
    y = ((x - lo) / rng).clamp_(0, 1) ** _per_channel(gamma, x) * rng + lo
    y = (y - y.mean(d, keepdim=True)) / (y.std(d, keepdim=True) + 1e-8) * std + mean
    return -y if invert else y


def _contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Scale around the mean, keeping the original value range ([n, C, *spatial], factor [n, C])."""
    d = _spatial(x)
    mean = x.mean(d, keepdim=True)
    lo, hi = x.amin(d, keepdim=True), x.amax(d, keepdim=True)
    return torch.minimum(torch.maximum((x - mean) * _per_channel(factor, x) + mean, lo), hi)


def _lowres(x: torch.Tensor, zoom: torch.Tensor) -> torch.Tensor:
    """Downsample (nearest) by `zoom` [n] and upsample back (bicubic): simulates a coarser scan."""
    h, w = x.shape[-2:]
    out = torch.empty_like(x)
    for i in range(len(x)):
        small = (max(1, round(h * float(zoom[i]))), max(1, round(w * float(zoom[i]))))
        down = F.interpolate(x[i : i + 1], size=small, mode="nearest-exact")
        out[i] = F.interpolate(down, size=(h, w), mode="bicubic", align_corners=False)[0]
    return out


def _on(x: torch.Tensor, sel: torch.Tensor, fn, *args: torch.Tensor) -> torch.Tensor:
    """Apply fn to the selected samples only; the others stay bit-identical."""
    idx = sel.nonzero().squeeze(1)
    if len(idx):
        dev_idx = idx.to(x.device)
        x[dev_idx] = fn(x[dev_idx], *(a[idx].to(x.device) for a in args))
    return x


@dataclass
class AugmentDraws:
    """Everything one batch's augmentation draws: which transforms fire per sample and their
    magnitudes. Applying draws is deterministic, so several runs' batches (each drawn from its own
    generator) can be augmented in one call (`AugmentDraws.cat`) with the same result per sample."""

    fire: torch.Tensor  # [B, n_transforms] bool
    mag: torch.Tensor  # [B, 5] per-sample magnitudes
    chan: torch.Tensor  # [B, C, 8] per-channel magnitudes (nnU-Net: channels independent)
    noise: torch.Tensor | None  # [B, C, H, W] standard normal (None: intensity transforms off)

    @staticmethod
    def cat(draws: list[AugmentDraws]) -> AugmentDraws:
        noise = [d.noise for d in draws]
        return AugmentDraws(
            torch.cat([d.fire for d in draws]),
            torch.cat([d.mag for d in draws]),
            torch.cat([d.chan for d in draws]),
            torch.cat(noise) if all(n is not None for n in noise) else None,  # type: ignore[misc]
        )

    def select(self, rows: torch.Tensor) -> AugmentDraws:
        """The draws of some samples only (a data-parallel rank's rows of the global batch)."""
        return AugmentDraws(
            self.fire[rows], self.mag[rows], self.chan[rows], None if self.noise is None else self.noise[rows]
        )


def draw_augmentation(
    shape: tuple[int, ...], strength: float, generator: torch.Generator, intensity: bool = True
) -> AugmentDraws:
    """The draws for a batch of `shape` [B, C, H, W], from a CPU generator in a fixed order and count
    (strength 0 draws nothing and fires nothing)."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"augmentation strength must be in [0, 1], got {strength}")
    b, c, h, w = shape
    if strength == 0:
        noise = torch.zeros(b, c, h, w) if intensity else None
        return AugmentDraws(
            torch.zeros(b, len(PROBABILITIES), dtype=torch.bool),
            torch.zeros(b, 5),
            torch.zeros(b, c, 8),
            noise,
        )
    probs = torch.tensor(list(PROBABILITIES.values())) * strength
    fire = torch.rand(b, len(PROBABILITIES), generator=generator) < probs
    mag = torch.rand(b, 5, generator=generator)
    chan = torch.rand(b, c, 8, generator=generator)
    noise = torch.randn(b, c, h, w, generator=generator) if intensity else None
    return AugmentDraws(fire, mag, chan, noise)


def _check_shapes(images: torch.Tensor, labels: torch.Tensor) -> None:
    if (
        images.ndim != 4
        or labels.ndim != 4
        or images.shape[0] != labels.shape[0]
        or images.shape[-2:] != labels.shape[-2:]
    ):
        raise ValueError(
            f"expected images [B,C,H,W], labels [B,T,H,W]; got {tuple(images.shape)}, {tuple(labels.shape)}"
        )


def augment_batch(
    images: torch.Tensor,
    labels: torch.Tensor,
    strength: float,
    generator: torch.Generator,
    spatial: bool = True,
    intensity: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Augment a batch: images float [B, C, H, W], labels [B, T, H, W] (binary, any dtype).

    Returns new tensors (inputs untouched), labels in their input dtype. Spatial transforms and
    mirroring (`spatial`) move images and labels together (labels: bilinear, then >= 0.5, as nnU-Net
    does for regions); `intensity` transforms touch the images only. Turning either off does not
    change the random draws of the other. `generator` must be a CPU generator.
    """
    _check_shapes(images, labels)
    draws = draw_augmentation(tuple(images.shape), strength, generator, intensity)
    if strength == 0:
        return images.to(torch.float32, copy=True), labels.clone()
    return apply_augmentation(images, labels, draws, spatial, intensity)


def augment_rows(
    images: torch.Tensor,
    labels: torch.Tensor,
    strength: float,
    generator: torch.Generator,
    batch_size: int,
    rows: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows `rows` of what `augment_batch` gives a batch of `batch_size` drawn from `generator`:
    images/labels hold those rows only. Data-parallel ranks thus augment their share of one
    global batch exactly as a single process would."""
    shape = (batch_size, *images.shape[1:])
    draws = draw_augmentation(tuple(shape), strength, generator).select(rows)
    if strength == 0:
        return images.to(torch.float32, copy=True), labels.clone()
    return apply_augmentation(images, labels, draws)


def apply_augmentation(
    images: torch.Tensor,
    labels: torch.Tensor,
    draws: AugmentDraws,
    spatial: bool = True,
    intensity: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply `draws` to a batch (see augment_batch); each sample's result depends on its own draws only."""
    _check_shapes(images, labels)
    x = images.to(torch.float32, copy=True)
    y = labels.clone()
    b, _, h, w = x.shape
    fire, mag, chan, noise = draws.fire, draws.mag, draws.chan, draws.noise

    if spatial:
        rot, scl = fire[:, _COL["rotate"]], fire[:, _COL["scale"]]
        angle = torch.where(rot, _uniform(mag[:, 0], -ROTATION, ROTATION), torch.zeros(b))
        scale = torch.where(scl, _uniform(mag[:, 1], *SCALE), torch.ones(b))
        idx = (rot | scl).nonzero().squeeze(1)
        if len(idx):
            dev_idx = idx.to(x.device)
            grid = F.affine_grid(
                _affine(angle[idx], scale[idx], h, w).to(x.device), [len(idx), 1, h, w], align_corners=False
            )
            x[dev_idx] = F.grid_sample(
                x[dev_idx], grid, mode="bilinear", padding_mode="zeros", align_corners=False
            )
            moved = F.grid_sample(
                y[dev_idx].float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False
            )
            y[dev_idx] = (moved >= 0.5).to(y.dtype)

    if intensity:
        assert noise is not None
        std = torch.where(fire[:, _COL["noise"]], _uniform(mag[:, 2], *NOISE_VARIANCE).sqrt(), torch.zeros(b))
        x = x + noise.to(x.device) * std.to(x.device)[:, None, None, None]
        x = _on(x, fire[:, _COL["blur"]], _gaussian_blur, _uniform(mag[:, 3], *BLUR_SIGMA))
        bright = _below_or_above_one(chan[..., 0], chan[..., 1], *BRIGHTNESS)
        x = _on(x, fire[:, _COL["brightness"]], lambda t, f: t * f[..., None, None], bright)
        x = _on(
            x,
            fire[:, _COL["contrast"]],
            _contrast,
            _below_or_above_one(chan[..., 2], chan[..., 3], *CONTRAST),
        )
        x = _on(x, fire[:, _COL["lowres"]], _lowres, _uniform(mag[:, 4], *LOWRES_ZOOM))
        g_inv = _below_or_above_one(chan[..., 4], chan[..., 5], *GAMMA)
        x = _on(x, fire[:, _COL["gamma_inverted"]], lambda t, g: _gamma(t, g, invert=True), g_inv)
        x = _on(
            x,
            fire[:, _COL["gamma"]],
            lambda t, g: _gamma(t, g, invert=False),
            _below_or_above_one(chan[..., 6], chan[..., 7], *GAMMA),
        )

    for col, dim in (("mirror_w", -1), ("mirror_h", -2)):
        idx = fire[:, _COL[col]].nonzero().squeeze(1).to(x.device)
        if spatial and len(idx):
            x[idx] = x[idx].flip(dim)
            y[idx] = y[idx].flip(dim)
    return x, y
