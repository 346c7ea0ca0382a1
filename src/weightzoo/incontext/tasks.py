"""Tasks for in-context training: sources, augmentation, hierarchical sampling, and the held-out list.

A *task* is a set of 2-D images with one binary label each that all mean the same thing (e.g. "the
cord in T2 axial slices"). Training draws a support set and a query from one task, so every source
returns `n` images of ONE task: images float32 [n, H, W] in 0..1, labels float32 [n, H, W] in {0, 1}.

Sources (hierarchical sampling: source -> task -> images):
  synth-shapes      unlimited tasks: textured scenes of 2-4 object classes (ellipses, blobs, stars,
                    rings) with a per-task size/intensity/texture recipe; the label is one class
  synth-superpixel  unlimited tasks: a random Voronoi-like partition of a textured image, the label one
                    region; the task's images are deformed, re-textured versions of that scene
  phantom           weightzoo.data.synth phantoms, every task x site (cord, gm, lesion at sites
                    A, B, C, E...; see HELD_OUT)
  raw:PATH          any nnU-Net raw dataset (e.g. from `weightzoo data import`), every task x site
  real, real:NAME   real training datasets (nuclei, axon/myelin, sagittal cord, CT/MR organs) and
  real-texture      synthetic label maps on their images: weightzoo.incontext.realdata
  curves            thin structures (vessel trees, fibres, membranes); real-texture-curves: the same
                    on real images: weightzoo.incontext.curves

Augmentation: `task_augment` draws ONE transform for the whole task (intensity inversion, label
flip, morphological edit of the label, affine, elastic, blur, noise), so the task changes but stays
consistent; `image_augment` perturbs each image independently (in-task variation).

HELD_OUT lists tasks never used in training, because we evaluate on them: `check_trainable` refuses
them (WBC nucleus/cell/cytoplasm, every SCT testing-data task incl. cord and gray matter, CHASE
vessels, HC18 heads, phantom canal, every phantom task at site D). The real training datasets are in
weightzoo.incontext.realdata.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from weightzoo.data.raw import RawDataset
from weightzoo.errors import InputError, UnknownNameError


# ---- preprocessing shared by training and inference ---------------------------------------------
def to_gray(image: np.ndarray) -> np.ndarray:
    """[H, W], [H, W, 3|4] (RGB/RGBA, channels last) or [C, H, W] (C <= 4) -> float32 [H, W] (mean of RGB)."""
    a = np.ascontiguousarray(image, dtype=np.float32)  # reoriented NIfTI slices have negative strides
    if a.ndim == 2:
        return a
    if a.ndim == 3 and a.shape[-1] in (3, 4) and a.shape[0] not in (1, 3, 4):
        return a[..., :3].mean(-1)
    if a.ndim == 3 and a.shape[0] in (1, 3, 4):
        return a[: min(3, a.shape[0])].mean(0)
    raise InputError(f"image of shape {a.shape} is not 2-D", "give [H, W], [H, W, 3] or [3, H, W] arrays")


def normalize_image(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Per image: map the 0.5th..99.5th percentiles to 0..1 and clip. [..., H, W] -> same shape."""
    t = torch.as_tensor(x, dtype=torch.float32)
    flat = t.reshape(-1, t.shape[-2] * t.shape[-1])
    lo, hi = torch.quantile(flat, torch.tensor([0.005, 0.995]), dim=1, keepdim=True)
    out = ((flat - lo) / (hi - lo).clamp_min(1e-8)).clamp(0, 1)
    return out.view(t.shape)


def pad_square(x: torch.Tensor, value: float = 0.0) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    """Centre-pad [..., H, W] to a square; returns the padded tensor and (top, bottom, left, right)."""
    h, w = x.shape[-2:]
    m = max(h, w)
    top, left = (m - h) // 2, (m - w) // 2
    pad = (top, m - h - top, left, m - w - left)
    return F.pad(x, (pad[2], pad[3], pad[0], pad[1]), value=value), pad


def to_model_grid(image: np.ndarray, size: int) -> torch.Tensor:
    """A 2-D image (any size, range, gray or RGB) -> float32 [size, size] in 0..1 (padded to square)."""
    x = normalize_image(to_gray(image))
    x, _ = pad_square(x)
    return _resize(x[None, None], size)[0, 0]


def label_to_model_grid(label: np.ndarray, size: int) -> torch.Tensor:
    """A binary [H, W] label -> float32 [size, size]: area-averaged (soft at borders), padded like the image."""
    y, _ = pad_square(torch.as_tensor(np.ascontiguousarray(label), dtype=torch.float32))
    if y.shape[-1] == size:
        return y
    return F.interpolate(y[None, None], size=(size, size), mode="area" if y.shape[-1] > size else "bilinear")[
        0, 0
    ].clamp(0, 1)


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


# ---- held-out tasks ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class HeldOut:
    kind: str  # dataset kind: wbc | sct | phantom
    task: str  # task name, or * for every task
    site: str = "*"  # site, or * for every site
    why: str = ""


HELD_OUT: tuple[HeldOut, ...] = (
    HeldOut("wbc", "nucleus", why="white-blood-cell nucleus (both sources): evaluation"),
    HeldOut("wbc", "cell", why="whole white blood cell: evaluation"),
    HeldOut("wbc", "cytoplasm", why="cell minus nucleus: too close to the two above"),
    HeldOut("sct", "cord", why="SCT spinal cord slices (all contrasts): evaluation"),
    HeldOut("sct", "gm", why="SCT gray-matter slices: evaluation"),
    HeldOut("sct", "*", why="every task of sct_testing_data and amu7t_example (7T cord/GM/WM)"),
    HeldOut("chase", "*", why="CHASE_DB1 retinal vessels (two observers): evaluation"),
    HeldOut("hc18", "*", why="HC18 fetal-head ultrasound: evaluation"),
    HeldOut("phantom", "canal", why="phantom canal, every site: the demo's unseen task"),
    HeldOut("phantom", "*", "D", why="every phantom task at site D (PD-like): unseen contrast"),
)


def dataset_kind(ds: RawDataset) -> str:
    """'wbc', 'sct', 'chase', 'hc18', 'phantom' or 'other', from the dataset's name, description and
    phantom key."""
    text = f"{ds.name} {ds.meta.get('description', '')} {ds.meta.get('name', '')}".lower()
    if "phantom" in ds.meta or "phantom" in text:
        return "phantom"
    if "wbc" in text or "white blood" in text:
        return "wbc"
    if "sct" in text or "spinal cord toolbox" in text or "sct_testing_data" in text or "amu7t" in text:
        return "sct"
    if "chase" in text or "retinal vessel" in text:
        return "chase"
    if "hc18" in text or "fetal head" in text or "fetal-head" in text:
        return "hc18"
    return "other"


def is_held_out(kind: str, task: str, site: str = "*") -> bool:
    aliases = {"cord": {"cord", "sc", "spinalcord"}, "gm": {"gm", "graymatter", "greymatter"}}
    for h in HELD_OUT:
        names = aliases.get(h.task, {h.task})
        if h.kind == kind and (h.task == "*" or task.lower() in names) and h.site in ("*", site):
            return True
    return False


def check_trainable(kind: str, task: str, site: str, where: str | Path | None = None) -> None:
    if is_held_out(kind, task, site):
        raise InputError(
            f"task '{task}' (site {site}) of a {kind} dataset is held out from in-context training",
            "it is kept for evaluation (see weightzoo.incontext.tasks.HELD_OUT); leave it out of --tasks",
            where,
        )


# ---- random helpers (all driven by an explicit torch.Generator) -------------------------------------
def _u(g: torch.Generator, lo: float, hi: float, n: int | tuple[int, ...] = ()) -> torch.Tensor:
    shape = (n,) if isinstance(n, int) else n
    return lo + (hi - lo) * torch.rand(shape, generator=g)


def _coin(g: torch.Generator, p: float) -> bool:
    return bool(torch.rand((), generator=g) < p)


def _randint(g: torch.Generator, lo: int, hi: int) -> int:
    """Uniform integer in [lo, hi]."""
    return int(torch.randint(lo, hi + 1, (), generator=g))


def smooth_noise(n: int, size: int, g: torch.Generator, cells: int) -> torch.Tensor:
    """Smooth random fields [n, size, size], unit std: bicubic upsampling of a cells x cells grid."""
    low = torch.randn(n, 1, max(2, cells), max(2, cells), generator=g)
    up = F.interpolate(low, size=(size, size), mode="bicubic", align_corners=False)[:, 0]
    return up / up.flatten(1).std(1).clamp_min(1e-6)[:, None, None]


def texture(n: int, size: int, g: torch.Generator) -> torch.Tensor:
    """Multi-scale texture [n, size, size]: two octaves of smooth noise with random weights, unit std."""
    w = _u(g, 0.0, 1.0, 2)
    t = w[0] * smooth_noise(n, size, g, _randint(g, 3, 8)) + w[1] * smooth_noise(
        n, size, g, _randint(g, 8, max(9, size // 4))
    )
    return t / t.flatten(1).std(1).clamp_min(1e-6)[:, None, None]


def _coords(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    c = torch.linspace(-1, 1, size)
    yy, xx = torch.meshgrid(c, c, indexing="ij")
    return yy, xx


# ---- geometric and intensity transforms on a stack [n, H, W] ----------------------------------------
def _affine_grid(
    n: int, size: int, g: torch.Generator, rot: float, scale: float, shift: float, shared: bool
) -> torch.Tensor:
    m = 1 if shared else n
    ang = _u(g, -rot, rot, m)
    sc = torch.exp(_u(g, -math.log(scale), math.log(scale), (m, 2)))
    tr = _u(g, -shift, shift, (m, 2))
    flip = torch.where(torch.rand(m, generator=g) < 0.5, -1.0, 1.0)
    cos, sin = torch.cos(ang), torch.sin(ang)
    theta = torch.stack(
        [
            torch.stack([cos * sc[:, 0] * flip, -sin * sc[:, 1], tr[:, 0]], 1),
            torch.stack([sin * sc[:, 0] * flip, cos * sc[:, 1], tr[:, 1]], 1),
        ],
        1,
    ).expand(n, 2, 3)
    return F.affine_grid(theta, (n, 1, size, size), align_corners=False)


def _elastic_grid(n: int, size: int, g: torch.Generator, amp: float, shared: bool) -> torch.Tensor:
    m = 1 if shared else n
    cells = _randint(g, 3, 6)
    disp = torch.stack([smooth_noise(m, size, g, cells), smooth_noise(m, size, g, cells)], -1) * amp
    yy, xx = _coords(size)
    ident = torch.stack([xx, yy], -1)[None]
    return (ident + disp).expand(n, size, size, 2)


def warp(x: torch.Tensor, y: torch.Tensor, grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Resample images [n, H, W] (bilinear) and labels (bilinear, then > 0.5) on grid [n, H, W, 2]."""
    both = torch.stack([x, y], 1)
    out = F.grid_sample(both, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out[:, 0], (out[:, 1] > 0.5).float()


def blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Gaussian blur of [n, H, W], one sigma (pixels) per image: separable grouped convolution."""
    n = x.shape[0]
    r = max(1, math.ceil(3 * float(sigma.max())))
    k = torch.arange(-r, r + 1, dtype=torch.float32)
    ker = torch.exp(-0.5 * (k[None] / sigma.clamp_min(1e-3)[:, None]) ** 2)
    ker = ker / ker.sum(1, keepdim=True)
    z = F.pad(x[None], (r, r, r, r), mode="replicate")
    z = F.conv2d(z, ker[:, None, None, :], groups=n)
    return F.conv2d(z, ker[:, None, :, None], groups=n)[0]


def _dilate(y: torch.Tensor, r: int) -> torch.Tensor:
    return F.max_pool2d(y[:, None], 2 * r + 1, 1, r)[:, 0]


def _erode(y: torch.Tensor, r: int) -> torch.Tensor:
    return 1 - _dilate(1 - y, r)


def renormalize(x: torch.Tensor) -> torch.Tensor:
    return normalize_image(x)


def task_augment(
    x: torch.Tensor, y: torch.Tensor, g: torch.Generator, strength: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """One random transform for the WHOLE task (all n images alike): x, y [n, H, W] -> same."""
    n, size = x.shape[0], x.shape[-1]
    p = strength
    if _coin(g, 0.25 * p):
        x = 1 - x  # intensity inversion
    if _coin(g, 0.25 * p):  # morphological edit of the label
        r = _randint(g, 1, 2)
        op = _randint(g, 0, 2)
        edited = _dilate(y, r) if op == 0 else _erode(y, r) if op == 1 else y - _erode(y, r)
        if edited.sum() > 0:
            y = edited
    if _coin(g, 0.1 * p) and float(y.mean()) < 0.5:
        y = 1 - y  # label flip: segment "everything but" the structure
    if _coin(g, 0.3 * p):
        x, y = warp(x, y, _affine_grid(n, size, g, math.pi, 1.25, 0.15, shared=True))
    if _coin(g, 0.2 * p):
        x, y = warp(x, y, _elastic_grid(n, size, g, 0.04, shared=True))
    if _coin(g, 0.2 * p):
        x = blur(x, _u(g, 0.3, 1.5, 1).expand(n))
    if _coin(g, 0.2 * p):
        x = x + float(_u(g, 0.01, 0.08)) * torch.randn(x.shape, generator=g)
    return renormalize(x), y


def image_augment(
    x: torch.Tensor, y: torch.Tensor, g: torch.Generator, strength: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Independent random perturbations of each image (in-task variation): x, y [n, H, W] -> same."""
    n, size = x.shape[0], x.shape[-1]
    p = strength
    sel = torch.rand(n, generator=g) < 0.5 * p
    if sel.any():
        gx, gy = warp(x, y, _affine_grid(n, size, g, 0.3, 1.15, 0.1, shared=False))
        x, y = torch.where(sel[:, None, None], gx, x), torch.where(sel[:, None, None], gy, y)
    sel = torch.rand(n, generator=g) < 0.2 * p
    if sel.any():
        gx, gy = warp(x, y, _elastic_grid(n, size, g, 0.03, shared=False))
        x, y = torch.where(sel[:, None, None], gx, x), torch.where(sel[:, None, None], gy, y)
    gamma = torch.exp(_u(g, -0.4, 0.4, n) * (torch.rand(n, generator=g) < 0.4 * p))
    x = x.clamp(0, 1) ** gamma[:, None, None]
    sel = torch.rand(n, generator=g) < 0.2 * p
    if sel.any():
        x = torch.where(sel[:, None, None], blur(x, _u(g, 0.3, 1.2, n)), x)
    sigma = _u(g, 0.0, 0.06, n) * (torch.rand(n, generator=g) < 0.3 * p)
    x = x + sigma[:, None, None] * torch.randn(x.shape, generator=g)
    return renormalize(x), y


# ---- sources ------------------------------------------------------------------------------------------
class TaskSource(Protocol):
    name: str

    def sample(self, n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, str]:
        """n images of one task: images [n, H, W] in 0..1, labels [n, H, W] in {0, 1}, task name."""
        ...


def _shape_masks(size: int, g: torch.Generator, n: int, kind: int, r_lo: float, r_hi: float) -> torch.Tensor:
    """One instance per image of a shape kind (0 ellipse, 1 blob, 2 star, 3 ring): bool [n, H, W]."""
    yy, xx = _coords(size)
    cx, cy = _u(g, -0.7, 0.7, n), _u(g, -0.7, 0.7, n)
    r = _u(g, r_lo, r_hi, n)
    aspect = torch.exp(_u(g, -0.5, 0.5, n))
    th = _u(g, 0, math.pi, n)
    dx, dy = xx[None] - cx[:, None, None], yy[None] - cy[:, None, None]
    c, s = torch.cos(th)[:, None, None], torch.sin(th)[:, None, None]
    u = (c * dx + s * dy) / aspect[:, None, None]
    v = (-s * dx + c * dy) * aspect[:, None, None]
    rho, phi = torch.sqrt(u**2 + v**2), torch.atan2(v, u)
    bound = torch.ones_like(rho)
    if kind in (1, 2):
        for m in (2, 3, 4, 5) if kind == 1 else (5,):
            amp = _u(g, 0.0, 0.12, n) if kind == 1 else _u(g, 0.25, 0.4, n)
            ph = _u(g, 0, 2 * math.pi, n)
            bound = bound + amp[:, None, None] * torch.cos(m * phi + ph[:, None, None])
    inside = rho <= r[:, None, None] * bound
    if kind == 3:
        inside &= rho >= r[:, None, None] * _u(g, 0.45, 0.75, n)[:, None, None]
    return inside


class SynthShapes:
    """Unlimited tasks: scenes of 2-4 object classes on a textured background; the label is class 0.

    The task recipe (per class: shape kind, size range, intensity, texture; background) is drawn once
    per task; each image draws new instances (1-3 targets, 0-3 of each other class, random order).
    """

    name = "synth-shapes"
    texture_gain = 1.0  # scales the texture amplitudes drawn per task

    def __init__(self, size: int = 64):
        self.size = size

    def _texture(self, n: int, g: torch.Generator) -> torch.Tensor:
        """One texture family for n images: [n, H, W], unit std (a subclass may use real images)."""
        return texture(n, self.size, g)

    def sample(self, n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, str]:
        size = self.size
        n_cls = _randint(g, 2, 4)
        bg_mean = float(_u(g, 0.0, 1.0))
        recipes = []
        for k in range(n_cls):
            while True:  # the target must differ visibly from the background
                mean = float(_u(g, 0.0, 1.0))
                if k > 0 or abs(mean - bg_mean) > 0.2:
                    break
            r_lo = float(_u(g, 0.06, 0.3))
            recipes.append(
                dict(
                    kind=_randint(g, 0, 3),
                    r=(r_lo, r_lo * float(_u(g, 1.0, 1.8))),
                    mean=mean,
                    tex=float(_u(g, 0.0, 0.15)),
                    count=(1, _randint(g, 1, 3)) if k == 0 else (0, _randint(g, 0, 3)),
                )
            )
        gain = self.texture_gain
        x = bg_mean + gain * float(_u(g, 0.01, 0.12)) * self._texture(n, g)
        y = torch.zeros(n, size, size)
        order = torch.randperm(n_cls, generator=g).tolist()
        if _coin(g, 0.7):  # mostly the targets lie on top; otherwise others may hide parts of them
            order = [k for k in order if k != 0] + [0]
        for k in order:
            rc = recipes[k]
            tex = self._texture(n, g) * (gain * rc["tex"])
            n_inst = torch.randint(rc["count"][0], rc["count"][1] + 1, (n,), generator=g)
            for j in range(int(n_inst.max())):
                m = _shape_masks(size, g, n, rc["kind"], *rc["r"]) & (j < n_inst)[:, None, None]
                x = torch.where(m, rc["mean"] + tex, x)
                y = torch.where(m, torch.tensor(1.0 if k == 0 else 0.0), y)
        return renormalize(x), y, self.name


class SynthSuperpixel:
    """Unlimited tasks: a warped Voronoi partition of a textured image; the label is one region
    (sometimes two). Each of the n images is the scene under its own affine + elastic deformation."""

    name = "synth-superpixel"

    def __init__(self, size: int = 64):
        self.size = size

    def _scene(self, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, int]:
        """A scene image [H, W] and its partition: region ids [H, W] in 0..m-1, and m."""
        size = self.size
        m = _randint(g, 5, 24)
        seeds = _u(g, -1.0, 1.0, (m, 2))
        yy, xx = _coords(size)
        warp_amp = float(_u(g, 0.0, 0.3))
        wy = yy + warp_amp * smooth_noise(1, size, g, 4)[0]
        wx = xx + warp_amp * smooth_noise(1, size, g, 4)[0]
        d = (wx[None] - seeds[:, 0, None, None]) ** 2 + (wy[None] - seeds[:, 1, None, None]) ** 2
        region = d.argmin(0)
        means = _u(g, 0.0, 1.0, m)
        return means[region] + float(_u(g, 0.02, 0.12)) * texture(1, size, g)[0], region, m

    def sample(self, n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, str]:
        size = self.size
        x0, region, m = self._scene(g)
        areas = torch.bincount(region.flatten(), minlength=m).float() / size**2
        ok = torch.nonzero((areas > 0.02) & (areas < 0.4)).flatten()
        pick = int(ok[torch.randint(len(ok), (), generator=g)]) if len(ok) else int(areas.argmax())
        label = region == pick
        if _coin(g, 0.3):  # a union of two neighbouring regions
            ring = _dilate(label[None].float(), 2)[0].bool() & ~label
            nb = region[ring]
            if len(nb):
                label |= region == int(nb[torch.randint(len(nb), (), generator=g)])
        x = x0[None].expand(n, size, size).clone()
        y = label.float()[None].expand(n, size, size).clone()
        x, y = warp(x, y, _affine_grid(n, size, g, 0.5, 1.2, 0.2, shared=False))
        x, y = warp(x, y, _elastic_grid(n, size, g, 0.05, shared=False))
        x = x + float(_u(g, 0.0, 0.1)) * texture(n, size, g)  # re-texture each image
        return renormalize(x), y, self.name


class SliceTasks:
    """Tasks from stored slices: pools {task name: (images [N, H, W] 0..1, labels [N, H, W])}.

    Sampling: a task uniformly, then n slices, 90 % of them among slices with foreground.
    """

    def __init__(self, name: str, pools: dict[str, tuple[torch.Tensor, torch.Tensor]]):
        self.name = name
        self.pools = {k: v for k, v in pools.items() if len(v[0]) > 0}
        if not self.pools:
            raise InputError(f"source '{name}' has no slices", "check the dataset and its tasks")
        self.keys = sorted(self.pools)

    def sample(self, n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, str]:
        key = self.keys[int(torch.randint(len(self.keys), (), generator=g))]
        x, y = self.pools[key]
        fg = torch.nonzero(y.flatten(1).any(1)).flatten()
        idx = torch.randint(len(x), (n,), generator=g)
        if len(fg):
            use_fg = torch.rand(n, generator=g) < 0.9
            idx = torch.where(use_fg, fg[torch.randint(len(fg), (n,), generator=g)], idx)
        return x[idx], y[idx], key


def dataset_pools(
    ds: RawDataset,
    size: int,
    tasks: Sequence[str] | None = None,
    split: str | None = "train",
    training: bool = True,
    axis: int = 2,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{'<dataset>/<task>/<site>': (images [N, size, size], labels)} for every task x site of a raw
    dataset, from the cases of `split`. `training=True` refuses held-out tasks (InputError)."""
    from weightzoo.data.slices import binary_task_masks, case_slices, load_case, mask_slices

    kind = dataset_kind(ds)
    tasks = list(tasks) if tasks is not None else list(ds.tasks)
    for t in tasks:
        ds.task_labels(t)
    pools: dict[str, tuple[list, list]] = {}
    for case in ds.cases_in(split):
        site = ds.site(case)
        wanted = [t for t in tasks if not (training and is_held_out(kind, t, site))]
        if not wanted:
            continue
        image, label = load_case(ds, case)
        xs = case_slices(image.array, axis, image.is_volume)  # [S, C, h, w]
        ys = binary_task_masks(mask_slices(label, axis, image.is_volume), [ds.task_labels(t) for t in wanted])
        for i in range(xs.shape[0]):
            xi = to_model_grid(xs[i], size)
            for k, t in enumerate(wanted):
                key = f"{ds.name}/{t}/{site}"
                pools.setdefault(key, ([], []))
                pools[key][0].append(xi)
                pools[key][1].append((label_to_model_grid(ys[k, i], size) >= 0.5).float())
    return {k: (torch.stack(a), torch.stack(b)) for k, (a, b) in pools.items()}


def phantom_source(
    cache: str | Path,
    size: int = 64,
    sites: int = 8,
    subjects: int = 10,
    seed: int = 1234,
    split: str = "train",
) -> SliceTasks:
    """Phantom tasks (every task x site that is not held out), generated once into `cache`."""
    from weightzoo.data.synth import make_phantom_dataset

    cache = Path(cache)
    found = sorted(cache.glob("Dataset*_InContextPhantom")) if cache.exists() else []
    ds = (
        RawDataset.open(found[0])
        if found
        else make_phantom_dataset(cache, sites, subjects, size, 8, seed, name="InContextPhantom")
    )
    return SliceTasks("phantom", dataset_pools(ds, size, split=split))


def raw_source(path: str | Path, size: int = 64, split: str = "train") -> SliceTasks:
    """Every trainable task x site of an nnU-Net raw dataset (held-out tasks are skipped)."""
    ds = RawDataset.open(path)
    kind = dataset_kind(ds)
    trainable = [t for t in ds.tasks if not all(is_held_out(kind, t, s) for s in ds.sites())]
    if not trainable:
        raise InputError(
            f"every task of this {kind} dataset is held out from in-context training",
            "see weightzoo.incontext.tasks.HELD_OUT; train on other data",
            ds.root,
        )
    return SliceTasks(f"raw:{ds.name}", dataset_pools(ds, size, trainable, split=split))


SOURCE_NAMES = (
    "synth",
    "synth-shapes",
    "synth-superpixel",
    "phantom",
    "raw:PATH",
    "real",
    "real:dsb2018",
    "real:axondeepseg",
    "real:errsm",
    "real:totalseg",
    "real-texture",
    "curves",
    "real-texture-curves",
)


def build_sources(
    names: Sequence[str], size: int, cache: str | Path, split: str = "train"
) -> list[TaskSource]:
    """Sources from names: synth (= both synthetic generators), synth-shapes, synth-superpixel,
    phantom, raw:PATH (an nnU-Net raw dataset folder), real (= every real training dataset of
    weightzoo.incontext.realdata, read from $WEIGHTZOO_DATA), real:NAME (one of
    them), real-texture (synthetic label maps on real images), curves and real-texture-curves (thin
    structures: weightzoo.incontext.curves)."""
    out: list[TaskSource] = []
    for name in names:
        if name == "synth":
            out += [SynthShapes(size), SynthSuperpixel(size)]
        elif name == "synth-shapes":
            out.append(SynthShapes(size))
        elif name == "synth-superpixel":
            out.append(SynthSuperpixel(size))
        elif name == "curves":
            from weightzoo.incontext.curves import SynthCurves

            out.append(SynthCurves(size))
        elif name == "phantom":
            out.append(phantom_source(Path(cache) / "phantom", size, split=split))
        elif name.startswith("raw:"):
            out.append(raw_source(name[4:], size, split=split))
        elif name in ("real", "real-texture", "real-texture-curves") or name.startswith("real:"):
            from weightzoo.incontext.realdata import REAL_DATASETS, real_sources

            which = (
                list(REAL_DATASETS) if name == "real" else [name[5:] if name.startswith("real:") else name]
            )
            out += real_sources(which, size, Path(cache) / "real")
        else:
            raise UnknownNameError("task source", name, SOURCE_NAMES)
    return out


class TaskSampler:
    """Hierarchical sampling: a source (by weight), a task in it, n images; then task + image augmentation.

    sample(batch, n, g) -> images [batch, n, H, W], labels [batch, n, H, W], task names.
    """

    def __init__(
        self, sources: Sequence[TaskSource], weights: Sequence[float] | None = None, augment: float = 1.0
    ):
        if not sources:
            raise InputError("no task sources", "give at least one, e.g. --tasks synth,phantom")
        self.sources = list(sources)
        w = torch.tensor(list(weights) if weights is not None else [1.0] * len(sources), dtype=torch.float64)
        self.weights = w / w.sum()
        self.augment = augment

    def sample(self, batch: int, n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        xs, ys, names = [], [], []
        for _ in range(batch):
            src = self.sources[int(torch.multinomial(self.weights, 1, generator=g))]
            x, y, name = src.sample(n, g)
            if self.augment > 0:
                x, y = task_augment(x, y, g, self.augment)
                x, y = image_augment(x, y, g, self.augment)
            xs.append(x)
            ys.append(y)
            names.append(name)
        return torch.stack(xs), torch.stack(ys), names
