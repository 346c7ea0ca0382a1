"""Real training tasks for in-context segmentation, read from the shared real-data folder.

Every task here is TRAINING data; the held-out real tasks (WBC, SCT cord/GM from sct_testing_data and
amu7t_example, CHASE vessels, HC18 heads) are never read by this module (see tasks.HELD_OUT).

  dataset       folder                         tasks (key = dataset/task/site)
  dsb2018       dsb2018_nuclei/                nuclei, one task per acquisition kind (colour x size)
  axondeepseg   axondeepseg_sem/, _tem/        axon, myelin, axon+myelin (and TEM unmyelinated axon),
                                               per modality (SEM, TEM)
  errsm         sct_errsm_t2/errsm_*/t2        spinal cord in SAGITTAL T2 slices (the axial GRE
                                               volume is left out: axial cord is a held-out task)
  totalseg      totalsegmentator_examples/     every organ label of the CT and the MR example, along
                                               each of the three axes (a model's labels, fine for
                                               training, not a ground truth)

Large microscopy images are cut into tiles (a fixed tile size per dataset, so a task keeps one scale)
before resizing to the model grid; volumes give their slices. `real_pools` caches the pools of one
dataset at one grid size in `cache/` as safetensors (written atomically), so a run reads the images
once. `texture_bank` stacks every real training image for the real-texture synthetic sources.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from weightzoo.errors import InputError, UnknownNameError
from weightzoo.incontext.tasks import (
    SynthShapes,
    SynthSuperpixel,
    _affine_grid,
    _coords,
    _randint,
    _u,
    label_to_model_grid,
    to_model_grid,
)

Pools = dict[str, tuple[torch.Tensor, torch.Tensor]]  # key -> (images [N, s, s] 0..1, labels {0, 1})
CACHE_VERSION = 1
REAL_DATA_FIX = "set WEIGHTZOO_DATA to the shared real-data folder (the one holding dsb2018_nuclei/ ...)"
MIN_IMAGES = 4  # a task needs at least this many images to give a support set and a query


def data_root_or_env(data_root: str | Path | None, fix: str) -> Path:
    """`data_root`, else $WEIGHTZOO_DATA. The package never guesses a folder: InputError (with `fix`)
    when neither is given."""
    if data_root is not None:
        return Path(data_root)
    env = os.environ.get("WEIGHTZOO_DATA")
    if not env:
        raise InputError("no real-data folder given", fix)
    return Path(env)


def _tiles(h: int, w: int, tile: int, max_tiles: int) -> Iterator[tuple[int, int, int]]:
    """Top-left corners (y, x) and side of up to `max_tiles` evenly spread square tiles of an h x w image."""
    side = min(tile, h, w)
    ny, nx = max(1, math.ceil(h / side)), max(1, math.ceil(w / side))
    ys = np.linspace(0, h - side, ny).round().astype(int)
    xs = np.linspace(0, w - side, nx).round().astype(int)
    corners = [(int(y), int(x)) for y in ys for x in xs]
    step = max(1, len(corners) // max_tiles)
    for y, x in corners[::step][:max_tiles]:
        yield y, x, side


class _PoolBuilder:
    """Collects grid-sized (image, label) pairs per task key."""

    def __init__(self, size: int):
        self.size = size
        self.items: dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}

    def add(self, key: str, image: np.ndarray, label: np.ndarray) -> None:
        xs, ys = self.items.setdefault(key, ([], []))
        xs.append(to_model_grid(image, self.size))
        ys.append((label_to_model_grid(label.astype(np.float32), self.size) >= 0.5).float())

    def add_tiles(self, key: str, image: np.ndarray, label: np.ndarray, tile: int, max_tiles: int) -> None:
        """image [H, W] or [H, W, 3], label [H, W]: evenly spread tiles of side `tile`."""
        for y, x, s in _tiles(label.shape[0], label.shape[1], tile, max_tiles):
            self.add(key, image[y : y + s, x : x + s], label[y : y + s, x : x + s])

    def pools(self) -> Pools:
        return {
            k: (torch.stack(a), torch.stack(b))
            for k, (a, b) in sorted(self.items.items())
            if len(a) >= MIN_IMAGES
        }


def _png(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im)


def _gray_or_rgb(a: np.ndarray) -> np.ndarray:
    """[H, W], [H, W, 2] (gray + alpha), [H, W, 3|4] -> [H, W] or [H, W, 3]."""
    if a.ndim == 3:
        return a[..., 0] if a.shape[-1] < 3 else a[..., :3]
    return a


def _dsb2018(root: Path, size: int) -> Pools:
    src = root / "dsb2018_nuclei"
    pb = _PoolBuilder(size)
    for p in sorted((src / "images").glob("*.png")):
        img = _gray_or_rgb(_png(p)).astype(np.float32)
        lab = _png(src / "labels" / p.name) > 0
        colour = img.ndim == 3 and float(np.abs(img - img.mean(-1, keepdims=True)).mean()) > 2.0
        kind = f"{'colour' if colour else 'gray'}-{img.shape[0]}x{img.shape[1]}"
        pb.add_tiles(f"dsb2018/nuclei/{kind}", img, lab, tile=256, max_tiles=4)
    return pb.pools()


def _axondeepseg(root: Path, size: int) -> Pools:
    pb = _PoolBuilder(size)
    for modality, tile, max_tiles in (("SEM", 384, 8), ("TEM", 300, 4)):
        src = root / f"axondeepseg_{modality.lower()}"
        for p in sorted(src.glob(f"sub-*/micr/*_{modality}.png")):
            img = _gray_or_rgb(_png(p)).astype(np.float32)
            labels = src / "derivatives" / "labels" / p.parent.relative_to(src)
            for m in sorted(labels.glob(f"{p.stem}_seg-*-manual.png")):
                task = re.sub(r".*_seg-(.+)-manual\.png$", r"\1", m.name)
                lab = _png(m)
                lab = (lab.max(-1) if lab.ndim == 3 else lab) > 0
                if lab.shape != img.shape[:2]:
                    raise InputError(f"mask {lab.shape} does not match image {img.shape[:2]}", "", m)
                pb.add_tiles(f"axondeepseg/{task}/{modality}", img, lab, tile, max_tiles)
    return pb.pools()


def _volume_slices(image: Path, mask: Path, axes: tuple[int, ...], min_voxels: int) -> Iterator:
    """(axis, label value, slice image [a, b], slice mask [a, b]) for every label and axis."""
    from weightzoo.data.io import read_image, read_mask

    img = read_image(image)
    seg = read_mask(mask, like=img)
    vol = img.array[0]
    for value in sorted(int(v) for v in np.unique(seg) if v > 0):
        m = seg == value
        for axis in axes:
            counts = m.sum(tuple(a for a in range(3) if a != axis))
            for z in np.nonzero(counts >= min_voxels)[0]:
                yield axis, value, np.take(vol, z, axis), np.take(m, z, axis)


def _errsm(root: Path, size: int) -> Pools:
    pb = _PoolBuilder(size)
    for case in sorted((root / "sct_errsm_t2").glob("errsm_*")):
        if not (case / "t2.nii.gz").exists():  # the axial GRE case: axial cord is held out
            continue
        for _, _, x, y in _volume_slices(
            case / "t2.nii.gz", case / "t2_manual_segmentation.nii.gz", (0,), 20
        ):
            pb.add("errsm/cord/sagittal-T2", x, y)
    return pb.pools()


def _totalseg(root: Path, size: int) -> Pools:
    src = root / "totalsegmentator_examples"
    pb = _PoolBuilder(size)
    for modality, image, seg in (
        ("ct", "example_ct_sm", "example_seg"),
        ("mr", "example_mr_sm", "example_seg_mr"),
    ):
        for axis, value, x, y in _volume_slices(
            src / f"{image}.nii.gz", src / f"{seg}.nii.gz", (0, 1, 2), 15
        ):
            pb.add(f"totalseg/{modality}-label{value}/axis{axis}", x, y)
    return pb.pools()


REAL_DATASETS: dict[str, tuple[str, Callable[[Path, int], Pools]]] = {
    "dsb2018": ("dsb2018_nuclei", _dsb2018),
    "axondeepseg": ("axondeepseg_sem", _axondeepseg),
    "errsm": ("sct_errsm_t2", _errsm),
    "totalseg": ("totalsegmentator_examples", _totalseg),
}


def real_pools(name: str, size: int, cache: str | Path, data_root: str | Path | None = None) -> Pools:
    """Pools of one real training dataset on a size x size grid; cached in `cache` (safetensors)."""
    from safetensors.torch import load_file, save_file

    if name not in REAL_DATASETS:
        raise UnknownNameError("real training dataset", name, list(REAL_DATASETS))
    folder, build = REAL_DATASETS[name]
    cached = Path(cache) / f"real-{name}-{size}px-v{CACHE_VERSION}.safetensors"
    if cached.exists():
        flat = load_file(str(cached))
        return {k[:-2]: (flat[k], flat[k[:-2] + "|y"]) for k in sorted(flat) if k.endswith("|x")}
    root = data_root_or_env(data_root, REAL_DATA_FIX)
    if not (root / folder).is_dir():
        raise InputError(
            f"real training data '{name}' not found",
            REAL_DATA_FIX,
            root / folder,
        )
    pools = build(root, size)
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(".tmp")
    flat = {f"{k}|{part}": t.contiguous() for k, (x, y) in pools.items() for part, t in (("x", x), ("y", y))}
    save_file(flat, str(tmp))
    os.replace(tmp, cached)  # atomic: a killed build leaves no half-written cache
    return pools


def texture_bank(pools: list[Pools], limit: int = 2000, seed: int = 0) -> torch.Tensor:
    """Up to `limit` real images [M, s, s] drawn evenly from every task of every pool (seeded)."""
    images = [x for p in pools for x, _ in p.values()]
    if not images:
        raise InputError("no real images for the texture bank", "add the 'real' task source data")
    g = torch.Generator().manual_seed(seed)
    per_task = max(1, limit // len(images))
    picked = [x[torch.randperm(len(x), generator=g)[:per_task]] for x in images]
    return torch.cat(picked)[:limit]


# ---- synthetic tasks on real textures (ScribblePrompt / UniverSeg style) ----------------------------
class OnRealTextures:
    """Mixin for a generator with a `_texture(n, g)` hook (SynthShapes, SynthCurves): its textures
    become crops of real images from `bank` [M, s, s] in 0..1, on an s x s grid."""

    texture_gain = 2.5  # real crops are structured; a stronger contrast keeps them visible

    def __init__(self, bank: torch.Tensor):
        super().__init__(bank.shape[-1])  # type: ignore[call-arg]
        self.bank = bank

    def _texture(self, n: int, g: torch.Generator) -> torch.Tensor:
        """One bank image seen n ways (random crop/rotation/scale): [n, s, s], zero mean, unit std."""
        src = self.bank[int(torch.randint(len(self.bank), (), generator=g))]
        grid = _affine_grid(n, self.bank.shape[-1], g, math.pi, 1.5, 0.5, shared=False)
        t = F.grid_sample(src.expand(n, 1, *src.shape), grid, padding_mode="reflection", align_corners=False)
        t = t[:, 0] - t[:, 0].mean((-2, -1), keepdim=True)
        return t / t.flatten(1).std(1).clamp_min(1e-3)[:, None, None]


class RealTextureShapes(OnRealTextures, SynthShapes):
    """SynthShapes whose background and object classes are textured with real images: each class
    takes one bank image, and every image of the task sees its own random crop/rotation of it."""

    name = "real-texture-shapes"


class RealSuperpixel(SynthSuperpixel):
    """SynthSuperpixel on a real image: the partition is a k-means clustering of (intensity, position)
    of one bank image, so region borders follow real edges; the task's images are deformations of it."""

    name = "real-superpixel"

    def __init__(self, bank: torch.Tensor):
        super().__init__(bank.shape[-1])
        self.bank = bank

    def _scene(self, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, int]:
        x0 = self.bank[int(torch.randint(len(self.bank), (), generator=g))]
        m = _randint(g, 5, 24)
        yy, xx = _coords(self.size)
        weight = float(_u(g, 1.0, 4.0))  # intensity vs position: larger = borders follow intensity more
        feats = torch.stack([weight * x0, yy, xx], -1).reshape(-1, 3)  # [H*W, 3]
        centres = feats[torch.randperm(len(feats), generator=g)[:m]]
        for _ in range(8):  # Lloyd's k-means
            assign = torch.cdist(feats, centres).argmin(1)
            sums = torch.zeros_like(centres).index_add_(0, assign, feats)
            counts = torch.bincount(assign, minlength=m).clamp_min(1)[:, None]
            centres = torch.where(counts > 0, sums / counts, centres)
        region = torch.cdist(feats, centres).argmin(1).view(self.size, self.size)
        return x0, region, m


def real_sources(names: list[str], size: int, cache: str | Path, data_root: str | Path | None = None) -> list:
    """SliceTasks per real dataset, or, for 'real-texture', the two real-texture generators
    ('real-texture-curves': the thin-structure one).

    A dataset's share of the draws is sqrt(number of tasks), capped at 3: more tasks count, but the
    152 organ tasks of the two TotalSegmentator examples (two subjects) do not drown the rest."""
    from weightzoo.incontext.tasks import SliceTasks

    out = []
    for name in names:
        if name in ("real-texture", "real-texture-curves"):
            from weightzoo.incontext.curves import RealTextureCurves

            bank = texture_bank([real_pools(n, size, cache, data_root) for n in REAL_DATASETS])
            out += (
                [RealTextureShapes(bank), RealSuperpixel(bank)]
                if name == "real-texture"
                else [RealTextureCurves(bank)]
            )
            continue
        src = SliceTasks(f"real:{name}", real_pools(name, size, cache, data_root))
        src.share = min(3.0, math.sqrt(len(src.keys)))  # type: ignore[attr-defined]
        out.append(src)
    return out
