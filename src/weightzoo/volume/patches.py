"""3-D training data: preprocessed volumes (`VolumeSet`), nnU-Net's patch sampling and 3-D augmentation.

A VolumeSet holds whole cases after nnU-Net's preprocessing (weightzoo.volume.preprocess: transpose,
crop to non-zero, normalisation, resampling to the target spacing), in nnU-Net's axis order
[z, y, x] (the NIfTI's voxel axes reversed): images [C, z, y, x] float32 and binary task masks
[K, z, y, x] uint8, one array per case (cases differ in shape).

Patches are drawn as nnU-Net's `nnUNetDataLoader` does: the last round(B·p) patches of a batch of B
are centred on a random foreground voxel of a randomly chosen task (p = foreground_oversample), the
others lie anywhere (a patch may stick out of the volume by up to half its size, padded with zeros). All randomness comes from a CPU `torch.Generator`, so a
batch depends only on (seed, step): 3-D runs resume bit-exactly, as 2-D ones do.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class VolumeSet:
    """Preprocessed cases of one dataset, in nnU-Net's axis order (see the module docstring)."""

    images: list[np.ndarray]  # per case [C, z, y, x] float32
    labels: list[np.ndarray]  # per case [K, z, y, x] uint8
    cases: list[str]
    case_sites: list[str]  # per case
    tasks: list[str]
    spacing: tuple[float, float, float]  # target spacing [z, y, x] mm, every case resampled to it
    preprocessing: Any  # the Preprocessing stored in the model folder (dims 3, its pipeline)
    # per case, per task: flat indices of foreground voxels (for oversampling)
    _fg: list[list[np.ndarray]] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        if not self._fg:
            self._fg = [[np.flatnonzero(lab[k]) for k in range(lab.shape[0])] for lab in self.labels]

    def __len__(self) -> int:
        return len(self.images)

    @property
    def n_channels(self) -> int:
        return int(self.images[0].shape[0])

    def sites(self) -> list[str]:
        return sorted(set(self.case_sites))

    def select(self, cases: Sequence[int], task_cols: Sequence[int] | None = None) -> VolumeSet:
        """Some cases, and some task channels (in the given order; None: all, arrays shared)."""
        cols = list(range(len(self.tasks))) if task_cols is None else list(task_cols)
        same = cols == list(range(len(self.tasks)))
        return VolumeSet(
            [self.images[i] for i in cases],
            [self.labels[i] if same else np.ascontiguousarray(self.labels[i][cols]) for i in cases],
            [self.cases[i] for i in cases],
            [self.case_sites[i] for i in cases],
            [self.tasks[k] for k in cols],
            self.spacing,
            self.preprocessing,
            [[self._fg[i][k] for k in cols] for i in cases],
        )

    def has_foreground(self) -> list[bool]:
        """Per task: does any case hold foreground?"""
        return [any(len(fg[k]) for fg in self._fg) for k in range(len(self.tasks))]

    def data_hash(self) -> str:
        """Fingerprint of the training data: a checkpoint never resumes on other data."""
        h = hashlib.sha256(json.dumps([self.tasks, list(self.spacing), self.cases]).encode())
        for x, y in zip(self.images, self.labels, strict=True):
            h.update(json.dumps([list(x.shape), list(y.shape)]).encode())
            h.update(np.ascontiguousarray(x, dtype=np.float32).tobytes())
            h.update(np.ascontiguousarray(y, dtype=np.uint8).tobytes())
        return h.hexdigest()[:16]

    # ---- patches -------------------------------------------------------------------------------
    def patch(self, case: int, lower: Sequence[int], size: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """The box [lower, lower + size) of one case, zero-padded where it leaves the volume."""
        x, y = self.images[case], self.labels[case]
        shape = x.shape[1:]
        src = tuple(slice(max(lo, 0), min(lo + s, n)) for lo, s, n in zip(lower, size, shape, strict=True))
        dst = tuple(
            slice(sl.start - lo, sl.stop - lo) for sl, lo in zip(src, lower, strict=True)
        )  # where the inside lands
        px = np.zeros((x.shape[0], *size), np.float32)
        py = np.zeros((y.shape[0], *size), np.uint8)
        px[(slice(None), *dst)] = x[(slice(None), *src)]
        py[(slice(None), *dst)] = y[(slice(None), *src)]
        return px, py

    def sample(
        self, generator: torch.Generator, batch_size: int, size: Sequence[int], oversample: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch of patches: images [B, C, *size] float32, labels [B, K, *size] uint8."""
        n_fg = batch_size - round(batch_size * (1 - oversample))
        case = torch.randint(len(self), (batch_size,), generator=generator).tolist()
        u = torch.rand(batch_size, 4, generator=generator).double().numpy()  # task, voxel, 2 spare
        corner = torch.rand(batch_size, 3, generator=generator).double().numpy()
        xs, ys = [], []
        for b in range(batch_size):
            shape = self.images[case[b]].shape[1:]
            # nnU-Net: a patch may leave the volume by half its size on each side
            lo = [-(s // 2) for s in size]
            hi = [max(n - s + s // 2, lo_a) for n, s, lo_a in zip(shape, size, lo, strict=True)]
            pools = [p for p in self._fg[case[b]] if len(p)]
            if b >= batch_size - n_fg and pools:
                pool = pools[min(int(u[b, 0] * len(pools)), len(pools) - 1)]
                voxel = np.unravel_index(int(pool[min(int(u[b, 1] * len(pool)), len(pool) - 1)]), shape)
                lower = [
                    min(max(int(v) - s // 2, a), z) for v, s, a, z in zip(voxel, size, lo, hi, strict=True)
                ]
            else:
                lower = [a + math.floor(c * (z - a + 1)) for c, a, z in zip(corner[b], lo, hi, strict=True)]
                lower = [min(v, z) for v, z in zip(lower, hi, strict=True)]
            px, py = self.patch(case[b], lower, size)
            xs.append(px)
            ys.append(py)
        return torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys))

    def validation_patches(self, size: Sequence[int], per_case: int = 2, seed: int = 0) -> Patches:
        """Fixed patches for validation during training (nnU-Net's pseudo Dice is on patches too):
        `per_case` per case, the first centred on foreground. Same seed, same patches."""
        g = torch.Generator().manual_seed(seed)
        xs, ys = [], []
        for case in range(len(self)):
            x, y = self.select([case]).sample(g, per_case, size, oversample=1.0 / per_case)
            xs.append(x.numpy())
            ys.append(y.numpy())
        return Patches(np.concatenate(xs), np.concatenate(ys))


@dataclass
class Patches:
    """Fixed patches (images [N, C, z, y, x], labels [N, K, z, y, x]): what `evaluate_slices` reads."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.images)


# ---- 3-D augmentation ------------------------------------------------------------------------------
# nnU-Net's 3-D defaults, in a subset that matters on small CPU runs: rotation in the (y, x) plane
# (nnU-Net rotates anisotropic data in-plane only, its "dummy 2-D" augmentation), scaling, Gaussian
# noise, brightness, contrast, gamma and mirroring along each axis. Probabilities per sample.
PROB_3D = {"rotate": 0.2, "scale": 0.2, "noise": 0.1, "brightness": 0.15, "contrast": 0.15, "gamma": 0.3}
MIRROR_P = 0.5


def _affine_3d(angle: torch.Tensor, scale: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """[n, 3, 4] affine_grid matrices: rotation by `angle` in the (y, x) plane, isotropic `scale`,
    in voxel units (affine_grid's coordinates run over [-1, 1] per axis, so the in-plane rotation
    is conjugated with the aspect ratio). affine_grid's 3-D coordinate order is (x, y, z)."""
    _, h, w = shape
    cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
    zero = torch.zeros_like(cos)
    row_x = torch.stack([cos, -sin * h / w, zero, zero], 1)
    row_y = torch.stack([sin * w / h, cos, zero, zero], 1)
    row_z = torch.stack([zero, zero, scale, zero], 1)
    return torch.stack([row_x, row_y, row_z], 1)


def augment_volumes(
    images: torch.Tensor, labels: torch.Tensor, strength: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Augment images [B, C, z, y, x] and binary labels [B, K, z, y, x]; new tensors, same dtypes.
    `strength` in [0, 1] scales every probability (0: off). Draws come from `generator` (CPU) in a
    fixed order and count, so a batch's augmentation depends only on the generator's state."""
    # imported here: weightzoo.train imports this module (VolumeSet), so a module-level import would cycle
    from weightzoo.train.augment import (
        BRIGHTNESS,
        CONTRAST,
        GAMMA,
        NOISE_VARIANCE,
        SCALE,
        _below_or_above_one,
        _contrast,
        _gamma,
        _on,
        _uniform,
    )

    b, c = images.shape[:2]
    shape = tuple(images.shape[2:])
    fire = torch.rand(b, len(PROB_3D), generator=generator) < torch.tensor(list(PROB_3D.values())) * strength
    mirror = torch.rand(b, 3, generator=generator) < MIRROR_P * strength
    mag = torch.rand(b, 3, generator=generator)
    chan = torch.rand(b, c, 6, generator=generator)
    noise = torch.randn(images.shape, generator=generator)
    x = images.to(torch.float32, copy=True)
    y = labels.clone()
    if strength == 0:
        return x, y
    col = {name: i for i, name in enumerate(PROB_3D)}
    rot, scl = fire[:, col["rotate"]], fire[:, col["scale"]]
    angle = torch.where(rot, _uniform(mag[:, 0], -math.pi, math.pi), torch.zeros(b))
    scale = torch.where(scl, _uniform(mag[:, 1], *SCALE), torch.ones(b))
    idx = (rot | scl).nonzero().squeeze(1)
    if len(idx):
        dev = idx.to(x.device)
        grid = F.affine_grid(
            _affine_3d(angle[idx], scale[idx], shape).to(x.device), [len(idx), 1, *shape], align_corners=False
        )
        x[dev] = F.grid_sample(x[dev], grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        moved = F.grid_sample(
            y[dev].float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False
        )
        y[dev] = (moved >= 0.5).to(y.dtype)
    std = torch.where(fire[:, col["noise"]], _uniform(mag[:, 2], *NOISE_VARIANCE).sqrt(), torch.zeros(b))
    x = x + noise.to(x.device) * std.to(x.device).reshape(b, 1, 1, 1, 1)
    bright = _below_or_above_one(chan[..., 0], chan[..., 1], *BRIGHTNESS)
    x = _on(x, fire[:, col["brightness"]], lambda t, f: t * f[..., None, None, None], bright)
    x = _on(
        x, fire[:, col["contrast"]], _contrast, _below_or_above_one(chan[..., 2], chan[..., 3], *CONTRAST)
    )
    x = _on(
        x,
        fire[:, col["gamma"]],
        lambda t, g: _gamma(t, g, invert=False),
        _below_or_above_one(chan[..., 4], chan[..., 5], *GAMMA),
    )
    for axis in range(3):
        sel = mirror[:, axis].nonzero().squeeze(1).to(x.device)
        if len(sel):
            x[sel] = x[sel].flip(2 + axis)
            y[sel] = y[sel].flip(2 + axis)
    return x, y
