"""Synthetic thin-structure tasks: vessel trees, fibres and membrane networks, 1-4 px wide.

Why: the in-context model trained on blobs, regions and real nuclei/cord/organs predicts almost nothing
on retinal vessels (held-out CHASE: Dice 0.03). No training task had long, thin, branching
foreground. These generators add that family, as ScribblePrompt and UniverSeg add synthetic label
maps; the held-out CHASE images are never read (textures come from procedural noise or from the
real training bank of weightzoo.incontext.realdata).

A task fixes a recipe (structure kind, width, tortuosity, contrast sign and size, distractors); every
image draws new instances of it. Kinds:
  tree      vessel-like: a few roots walk inwards from the border with smoothly turning headings and
            branch; widths taper at each branch
  fibres    long smooth curves crossing the field
  network   membrane-like: the boundaries of a warped Voronoi partition
Distractors (optional): curves of another width or contrast sign, or blobs, which are NOT labelled.

  SynthCurves(size).sample(n, g)   -> images [n, H, W] in 0..1, labels [n, H, W] in {0, 1}, name
  RealTextureCurves(bank)          the same on real-image textures
"""

from __future__ import annotations

import math

import numpy as np
import torch

from weightzoo.incontext.realdata import OnRealTextures
from weightzoo.incontext.tasks import (
    _coin,
    _coords,
    _randint,
    _shape_masks,
    _u,
    renormalize,
    smooth_noise,
    texture,
)


def _walk(
    g: torch.Generator, start: torch.Tensor, heading: float, steps: int, step: float, turn: float
) -> torch.Tensor:
    """A smooth random walk: points [steps+1, 2] (x, y in -1..1 units) from `start`."""
    dtheta = turn * torch.randn(steps, generator=g)
    dtheta = torch.cumsum(dtheta - dtheta.mean() * 0.5, 0)  # heading drifts smoothly
    theta = heading + dtheta
    moves = step * torch.stack([torch.cos(theta), torch.sin(theta)], 1)
    return torch.cat([start[None], start[None] + torch.cumsum(moves, 0)])


def _distance_to_polylines(
    size: int, lines: list[tuple[torch.Tensor, float]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per pixel: the distance (pixels) to the nearest centreline and that line's half-width.

    lines: (points [P, 2] in -1..1, width in pixels). The polylines are sampled every 0.25 px onto the
    pixel grid and scipy's exact Euclidean distance transform does the rest (a quarter of a pixel of
    error, and ~50x faster than point-to-segment distances). Returns d [H, W], half-width [H, W]."""
    from scipy.ndimage import distance_transform_edt

    centre = np.zeros((size, size), bool)
    half = np.zeros((size, size), np.float32)
    for pts, width in lines:
        p = pts.numpy() * (size / 2) + (size - 1) / 2  # -1..1 -> pixel centres (align_corners=False)
        seg = np.diff(p, axis=0)
        n_sub = np.maximum(1, np.ceil(np.linalg.norm(seg, axis=1) * 4).astype(int))
        dense = np.concatenate(
            [
                a + np.linspace(0, 1, k, endpoint=False)[:, None] * d
                for a, d, k in zip(p[:-1], seg, n_sub, strict=True)
            ]
            + [p[-1:]]
        )
        ij = np.round(dense[:, ::-1]).astype(int)  # (row, col)
        ij = ij[((ij >= 0) & (ij < size)).all(1)]
        fresh = ~centre[ij[:, 0], ij[:, 1]]  # the first (wider, earlier) line keeps a shared pixel
        half[ij[fresh, 0], ij[fresh, 1]] = width / 2
        centre[ij[:, 0], ij[:, 1]] = True
    if not centre.any():
        return torch.full((size, size), float("inf")), torch.full((size, size), 0.5)
    d, (ii, jj) = distance_transform_edt(~centre, return_indices=True)
    return torch.from_numpy(d.astype(np.float32)), torch.from_numpy(half[ii, jj])


def _tree(g: torch.Generator, size: int, width: float, turn: float) -> list[tuple[torch.Tensor, float]]:
    lines: list[tuple[torch.Tensor, float]] = []
    step = 3.0 / size  # 1.5 px per point
    for _ in range(_randint(g, 1, 3)):
        side = _randint(g, 0, 3)
        s = float(_u(g, -0.9, 0.9))
        start = torch.tensor([[-1.0, s], [1.0, s], [s, -1.0], [s, 1.0]][side])
        heading = [0.0, math.pi, math.pi / 2, -math.pi / 2][side] + float(_u(g, -0.6, 0.6))
        stack = [(start, heading, width, 0)]
        while stack and len(lines) < 24:
            st, hd, w, depth = stack.pop()
            n_steps = _randint(g, size // 4, size)
            pts = _walk(g, st, hd, n_steps, step, turn)
            lines.append((pts, max(w, 0.8)))
            if depth < 3:
                for _ in range(_randint(g, 1, 3)):
                    at = _randint(g, n_steps // 5, n_steps - 1)
                    sign = 1.0 if _coin(g, 0.5) else -1.0
                    seg = pts[at] - pts[at - 1]
                    h = math.atan2(float(seg[1]), float(seg[0])) + sign * float(_u(g, 0.4, 1.2))
                    stack.append((pts[at], h, w * float(_u(g, 0.55, 0.85)), depth + 1))
    return lines


def _fibres(g: torch.Generator, size: int, width: float, turn: float) -> list[tuple[torch.Tensor, float]]:
    lines = []
    for _ in range(_randint(g, 2, 7)):
        start = _u(g, -1.0, 1.0, 2)
        heading = float(_u(g, 0, 2 * math.pi))
        pts = _walk(g, start, heading, size, 2.0 / size, turn * 0.5)  # both ways from the start
        back = _walk(g, start, heading + math.pi, size, 2.0 / size, turn * 0.5)
        lines.append((torch.cat([back.flip(0), pts[1:]]), width * float(_u(g, 0.8, 1.25))))
    return lines


def _network(g: torch.Generator, size: int, width: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Membranes: distance (pixels) to the boundaries of a warped Voronoi partition, and half-widths."""
    m = _randint(g, 6, 40)
    seeds = _u(g, -1.1, 1.1, (m, 2))
    yy, xx = _coords(size)
    amp = float(_u(g, 0.0, 0.15))
    wy, wx = yy + amp * smooth_noise(1, size, g, 4)[0], xx + amp * smooth_noise(1, size, g, 4)[0]
    d = ((wx[None] - seeds[:, 0, None, None]) ** 2 + (wy[None] - seeds[:, 1, None, None]) ** 2).sqrt()
    two = d.topk(2, dim=0, largest=False).values
    return (two[1] - two[0]) * (size / 4), torch.full((size, size), width / 2)


class SynthCurves:
    """Unlimited thin-structure tasks (see the module docstring); textures are procedural noise."""

    name = "synth-curves"
    texture_gain = 1.0

    def __init__(self, size: int = 64):
        self.size = size

    def _texture(self, n: int, g: torch.Generator) -> torch.Tensor:
        return texture(n, self.size, g)

    def _structure(self, g: torch.Generator, rc: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """One instance of a recipe: label bool [H, W], intensity profile [H, W] in 0..1."""
        if rc["kind"] == "network":
            d, half = _network(g, self.size, rc["width"])
        else:
            make = _tree if rc["kind"] == "tree" else _fibres
            d, half = _distance_to_polylines(self.size, make(g, self.size, rc["width"], rc["turn"]))
        label = d <= half
        profile = torch.exp(-0.5 * (d / half.clamp_min(0.5)) ** 2)  # a vessel's soft cross-section
        return label, profile

    def _recipe(self, g: torch.Generator) -> dict:
        scale = self.size / 128  # widths are drawn for 128 px and scale with the grid
        return dict(
            kind=["tree", "tree", "fibres", "network"][_randint(g, 0, 3)],
            width=float(_u(g, 1.0, 4.0)) * scale,
            turn=float(_u(g, 0.02, 0.25)),
            contrast=float(_u(g, 0.25, 0.8)) * (1.0 if _coin(g, 0.5) else -1.0),
        )

    def sample(self, n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, str]:
        size = self.size
        target = self._recipe(g)
        other = self._recipe(g) if _coin(g, 0.4) else None  # unlabelled curves of another recipe
        if (
            other is not None
            and abs(other["width"] - target["width"]) < 1.0
            and other["contrast"] * target["contrast"] > 0
        ):
            other["width"] = target["width"] * 2.5  # must differ: thicker
        blobs = _coin(g, 0.3)
        bg = float(_u(g, 0.2, 0.8)) + float(_u(g, 0.02, 0.15)) * self.texture_gain * self._texture(n, g)
        bg = bg + float(_u(g, 0.0, 0.3)) * smooth_noise(n, size, g, 2)  # slow illumination changes
        xs, ys = [], []
        for i in range(n):
            x = bg[i]
            if blobs:
                m = _shape_masks(size, g, _randint(g, 1, 4), _randint(g, 0, 2), 0.05, 0.2).any(0)
                x = torch.where(m, x + float(_u(g, -0.4, 0.4)), x)
            if other is not None:
                _, prof = self._structure(g, other)
                x = x + other["contrast"] * prof
            label, prof = self._structure(g, target)
            xs.append(x + target["contrast"] * prof)
            ys.append(label.float())
        return renormalize(torch.stack(xs)), torch.stack(ys), self.name


class RealTextureCurves(OnRealTextures, SynthCurves):
    """SynthCurves on real-image backgrounds: one bank image per task, a random crop/rotation per image."""

    name = "real-texture-curves"
