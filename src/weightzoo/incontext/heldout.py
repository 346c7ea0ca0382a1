"""Held-out tasks for in-context evaluation (never trained on), loaded onto the model grid.

Real tasks (REAL_TASKS; read from the shared real-data folder, see `resolve_data_root`):
  wbc-nucleus, wbc-cell      WBC 'Dataset 1' (120 px RGB -> gray), nucleus / whole cell; one group per image
  wbc2-nucleus, wbc2-cell    WBC 'Dataset 2' (300 px)
  sct-cord                   SCT T2 axial slices (t2/t2.nii.gz, 55 slices with cord), one subject
  sct-cord-t1                SCT T1 axial slices (t1/t1w.nii.gz)
  sct-gm                     SCT T2* gray matter (t2s_uncropped, 11 slices cropped around the cord)
  chase-vessels              CHASE_DB1 retinal vessels: 28 fundus images (14 children x 2 eyes,
                             999 x 960 px), each cut into its 4 corner crops of 480 px (resizing the whole
                             image to the model grid would erase the vessels; the 39 central columns are
                             left out so every crop is square); reference = observer 1, observer 2 kept
                             aligned in `raters` (for GED); grouped by CHILD
  hc18-head                  HC18 fetal-head ultrasound (800 x 540 px); the annotations in the shared
                             folder are already filled masks (the challenge's are ellipse outlines), and
                             `binary_fill_holes` is applied anyway so an outline would also become the head;
                             grouped by subject (NNN of NNN_HC.png / NNN_2HC.png)
Not real (PHANTOM_TASKS; never in the mean over real tasks): phantom-canal (canal at site B),
phantom-D-cord (cord at the unseen site D), generated with weightzoo.data.synth (seed 4242).

Every task: images float32 [N, size, size] in 0..1 and labels {0, 1} [N, size, size] (the label is
area-resampled, then thresholded at 0.5), `groups` name the subject (or image) each entry belongs to,
so `split_queries` can keep a group on one side of the query/support split.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from weightzoo.errors import InputError, UnknownNameError
from weightzoo.incontext.tasks import label_to_model_grid, to_model_grid

REAL_TASKS = (
    "wbc-nucleus",
    "wbc-cell",
    "wbc2-nucleus",
    "wbc2-cell",
    "sct-cord",
    "sct-cord-t1",
    "sct-gm",
    "chase-vessels",
    "hc18-head",
)
PHANTOM_TASKS = ("phantom-canal", "phantom-D-cord")
EVAL_TASKS = REAL_TASKS + PHANTOM_TASKS
DEFAULT_TASKS = REAL_TASKS
DATA_FIX = "give --data with the shared real-data folder (the one holding wbc/, chasedb1/, hc18/ ...)"


@dataclass
class EvalTask:
    """A held-out task on the model grid: images/labels [N, size, size]; groups name the subject/image;
    raters [N, R, size, size]: further annotators' masks aligned with labels (None when there is one)."""

    name: str
    images: torch.Tensor
    labels: torch.Tensor
    groups: list[str]
    source: str
    raters: torch.Tensor | None = None

    @property
    def real(self) -> bool:
        return self.name in REAL_TASKS


def resolve_data_root(data_root: str | Path | None) -> Path:
    """The real-data folder: `data_root`, else $WEIGHTZOO_DATA; InputError if neither or absent."""
    from weightzoo.incontext.realdata import data_root_or_env

    fix = DATA_FIX if data_root is not None else DATA_FIX + ", or set WEIGHTZOO_DATA"
    root = data_root_or_env(data_root, fix)
    if not root.is_dir():
        raise InputError("real-data folder not found", fix, root)
    return root


def _need_dir(p: Path, what: str) -> Path:
    if not p.is_dir():
        raise InputError(f"{what} folder not found", DATA_FIX, p)
    return p


def _read_pil(path: Path, mode: str) -> np.ndarray:
    from PIL import Image as PILImage

    if not path.is_file():
        raise InputError("file not found", "restore it from the data set's source", path)
    try:
        with PILImage.open(path) as im:
            return np.asarray(im.convert(mode))
    except OSError as e:
        raise InputError(f"cannot read the image ({e})", "replace the file", path) from None


def _grid_labels(ys: Sequence[np.ndarray], size: int) -> torch.Tensor:
    return torch.stack([(label_to_model_grid(b.astype(np.float32), size) >= 0.5).float() for b in ys])


def _grid(xs: Sequence[np.ndarray], ys: Sequence[np.ndarray], size: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.stack([to_model_grid(a, size) for a in xs]), _grid_labels(ys, size)


def _wbc(root: Path, folder: str, task: str, limit: int) -> tuple[list, list, list]:
    from weightzoo.data.importers import WBC_CLASSES, map_to_nearest
    from weightzoo.data.io import read_image

    src = _need_dir(root / "wbc" / folder, "WBC")
    xs, ys, gs = [], [], []
    for p in sorted(src.glob("*.bmp"))[:limit]:
        m, _ = map_to_nearest(read_image(p.with_suffix(".png")).array.max(0), WBC_CLASSES)
        xs.append(read_image(p).array)
        ys.append(m == 2 if task == "nucleus" else m > 0)  # indices: 0 bg, 1 cytoplasm, 2 nucleus
        gs.append(p.stem)
    return xs, ys, gs


def _nifti_slices(image: Path, mask: Path, crop: int | None = None) -> tuple[list, list, list]:
    from weightzoo.data.io import read_image, read_mask

    for p in (image, mask):
        if not p.is_file():
            raise InputError("SCT testing file not found", DATA_FIX, p)
    img = read_image(image)
    m = read_mask(mask, like=img) > 0
    x = img.array[0]
    if crop:  # a window around the mask's centre (e.g. the cord in an uncropped 320 px FOV)
        cx, cy = (round(float(np.mean(a))) for a in np.nonzero(m)[:2])
        h = crop // 2
        x = x[max(0, cx - h) : cx + h, max(0, cy - h) : cy + h]
        m = m[max(0, cx - h) : cx + h, max(0, cy - h) : cy + h]
    zs = [z for z in range(m.shape[2]) if m[:, :, z].any()]
    return [x[:, :, z] for z in zs], [m[:, :, z] for z in zs], [f"{image.name}:{z}" for z in zs]


_CHASE = re.compile(r"^Image_(\d+)([LR])\.jpg$")


def corner_crops(h: int, w: int) -> list[tuple[int, int, int]]:
    """(top, left, side) of the 4 square corner crops of an h x w image, side = min(h, w) // 2."""
    side = min(h, w) // 2
    return [(y, x, side) for y in (0, h - side) for x in (0, w - side)]


def _chase(root: Path, limit: int) -> tuple[list, list, list, list]:
    """-> RGB crops [480, 480, 3], observer-1 masks, observer-2 masks, groups ('child01'...)."""
    src = _need_dir(root / "chasedb1", "CHASE_DB1")
    files = sorted(p for p in src.glob("Image_*.jpg") if _CHASE.match(p.name))
    if not files:
        raise InputError("no Image_NNX.jpg fundus images", DATA_FIX, src)
    xs, ys, y2s, gs = [], [], [], []
    for p in files:
        if len(xs) + 4 > limit:  # whole images only
            break
        m = _CHASE.match(p.name)
        assert m is not None
        rgb = _read_pil(p, "RGB")
        obs = [_read_pil(p.with_name(f"{p.stem}_{o}.png"), "L") > 127 for o in ("1stHO", "2ndHO")]
        if any(o.shape != rgb.shape[:2] for o in obs):
            raise InputError("observer mask and image sizes differ", "use the masks drawn on this image", p)
        for y, x, s in corner_crops(*rgb.shape[:2]):
            xs.append(rgb[y : y + s, x : x + s])
            ys.append(obs[0][y : y + s, x : x + s])
            y2s.append(obs[1][y : y + s, x : x + s])
            gs.append(f"child{m.group(1)}")
    return xs, ys, y2s, gs


_HC18 = re.compile(r"^(\d+)_(\d*)HC\.png$")


def _hc18(root: Path, limit: int) -> tuple[list, list, list]:
    """-> gray images [540, 800], filled head masks, groups ('hc000'...: one per subject number)."""
    from scipy.ndimage import binary_fill_holes

    src = _need_dir(root / "hc18" / "training_set", "HC18 training_set")
    files = sorted(p for p in src.glob("*HC.png") if _HC18.match(p.name))[:limit]
    if not files:
        raise InputError("no NNN_HC.png ultrasound images", DATA_FIX, src)
    xs, ys, gs = [], [], []
    for p in files:
        m = _HC18.match(p.name)
        assert m is not None
        xs.append(_read_pil(p, "L"))
        ys.append(binary_fill_holes(_read_pil(p.with_name(f"{p.stem}_Annotation.png"), "L") > 127))
        gs.append(f"hc{int(m.group(1)):03d}")
    return xs, ys, gs


def _phantom(task: str, site: str, size: int, cache: Path) -> tuple[list, list, list]:
    from weightzoo.data.raw import RawDataset
    from weightzoo.data.slices import load_case
    from weightzoo.data.synth import make_phantom_dataset

    found = sorted(cache.glob("Dataset*_EvalPhantom")) if cache.exists() else []
    ds = (
        RawDataset.open(found[0])
        if found
        else make_phantom_dataset(cache, 4, 8, size, 8, 4242, name="EvalPhantom")
    )
    xs, ys, gs = [], [], []
    for case in ds.cases_in(None, [site]):
        img, lab = load_case(ds, case)
        m = np.isin(lab, ds.task_labels(task))
        for z in range(m.shape[2]):
            if m[:, :, z].any():
                xs.append(img.array[0, :, :, z])
                ys.append(m[:, :, z])
                gs.append(ds.subject(case))
    return xs, ys, gs


def load_eval_task(
    name: str, data_root: str | Path | None, size: int, cache: Path, limit: int = 120
) -> EvalTask:
    """Build one held-out task (see the module docstring) on the model grid, at most `limit` images
    (CHASE: crops, whole images only). Unknown name: UnknownNameError; missing data: InputError."""
    if name not in EVAL_TASKS:
        raise UnknownNameError("held-out task", name, EVAL_TASKS)
    raters = None
    if name in PHANTOM_TASKS:
        site_task = ("canal", "B") if name == "phantom-canal" else ("cord", "D")
        xs, ys, gs = _phantom(*site_task, size, cache)
        src = "weightzoo.data.synth phantoms (seed 4242)"
    else:
        root = resolve_data_root(data_root)
        if name.startswith("wbc"):
            folder = "Dataset 1" if name.startswith("wbc-") else "Dataset 2"
            xs, ys, gs = _wbc(root, folder, name.split("-")[1], limit)
            src = f"wbc/{folder}"
        elif name == "chase-vessels":
            xs, ys, y2s, gs = _chase(root, limit)
            raters = _grid_labels(y2s, size)[:, None]
            src = "chasedb1 (4 corner crops per image; observer 1, observer 2 as second rater)"
        elif name == "hc18-head":
            xs, ys, gs = _hc18(root, limit)
            src = "hc18/training_set"
        else:
            sct = _need_dir(root / "sct_testing_data", "SCT testing data")
            files = {
                "sct-cord": ("t2/t2.nii.gz", "t2/t2_seg-manual.nii.gz", None),
                "sct-cord-t1": ("t1/t1w.nii.gz", "t1/t1w_seg-manual.nii.gz", None),
                "sct-gm": ("t2s/t2s_uncropped.nii.gz", "t2s/t2s_uncropped_gmseg_manual.nii.gz", 64),
            }[name]
            xs, ys, gs = _nifti_slices(sct / files[0], sct / files[1], files[2])
            xs, ys, gs = xs[:limit], ys[:limit], gs[:limit]
            src = f"sct_testing_data/{files[0]}"
    x, y = _grid(xs, ys, size)
    return EvalTask(name, x, y, gs, src, raters)


def load_tasks(
    names: Sequence[str], data_root: str | Path | None, size: int, cache: Path, limit: int = 120
) -> list[EvalTask]:
    """All tasks at once (so a missing folder fails before any evaluation); names checked first."""
    for name in names:
        if name not in EVAL_TASKS:
            raise UnknownNameError("held-out task", name, EVAL_TASKS)
    return [load_eval_task(n, data_root, size, cache, limit) for n in names]


def split_queries(task: EvalTask, n_queries: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(query indices, pool indices), seeded: whole groups go to the queries until there are at least
    min(n_queries, N // 3) of them (a group is never split, so there can be a few more). -> int arrays."""
    rng = np.random.default_rng(seed)
    n = len(task.groups)
    want = max(1, min(n_queries, n // 3))
    groups = sorted(set(task.groups))
    if len(groups) == 1:  # one subject: the split can only be by image
        q_idx = np.sort(rng.choice(n, want, replace=False))
    else:
        q: list[int] = []
        for gname in rng.permutation(groups):
            if len(q) >= want:
                break
            q += [i for i, g in enumerate(task.groups) if g == gname]
        q_idx = np.array(sorted(q))
    chosen = set(q_idx.tolist())
    pool = np.array([i for i in range(n) if i not in chosen], dtype=int)
    return q_idx, pool
