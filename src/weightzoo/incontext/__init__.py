"""In-context segmentation: segment a new task from a few labelled examples, with no training.

    from weightzoo import incontext
    probs = incontext.segment(query, support_images, support_labels, candidates=1, ensemble=1, tta=0)

query: a 2-D image [H, W] of any size and intensity range (RGB [H, W, 3] or [3, H, W] is converted
to gray: the mean of R, G, B). support_images: [S, H', W'] or a list of 2-D (or RGB) arrays of any
sizes; support_labels: the same number of binary masks, each the size of its image (values {0, 1},
bool, or {0, v} such as {0, 255}). Returns float32 [candidates, H, W] in 0..1 at the query's size.

Every image is normalised on its own (0.5th..99.5th percentile -> 0..1), centre-padded to a square
and resized to the model's size (128 px for the shipped model); the result is mapped back.

- candidates=K: K plausible segmentations (Tyche): each candidate has its own noise input and the
  candidates interact inside the network, so they spread where the task is ambiguous.
- ensemble=E: average E predictions, each from a random subset of the support
  (`subset` images each; default ceil(3/4 of the support)).
- tta=T: also predict from T augmented copies of the support (flips/rotations/scaling, intensity,
  noise: the same transform for an image and its mask) and average.
With candidates > 1, the E·(1+T) runs are dealt out to the candidates (run r to candidate r mod K),
so candidates also differ by their support variant (Tyche's in-context augmentation).

`model=` takes a model folder (from `weightzoo incontext train`) or a loaded InContextNet; by default
the shipped pretrained model (weightzoo/incontext/weights, loaded offline). See docs/incontext.md.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from weightzoo.errors import InputError
from weightzoo.incontext.model import CrossConv2d, InContextNet, InContextSpec, best_candidate_loss
from weightzoo.incontext.tasks import (
    HELD_OUT,
    image_augment,
    label_to_model_grid,
    pad_square,
    to_gray,
    to_model_grid,
)
from weightzoo.incontext.train import (
    InContextConfig,
    load_incontext_model,
    shipped_weights_dir,
    train_incontext,
)

__all__ = [
    "HELD_OUT",
    "CrossConv2d",
    "InContextConfig",
    "InContextNet",
    "InContextSpec",
    "InContextWarning",
    "best_candidate_loss",
    "load_model",
    "load_support",
    "prepare_support",
    "segment",
    "segment_batch",
    "shipped_weights_dir",
    "train_incontext",
]

ENSEMBLE_FRACTION = 0.75  # default share of the support each ensemble member sees
_CACHE: dict[tuple[str, str], InContextNet] = {}


class InContextWarning(UserWarning):
    """A result is still produced, but the support makes it less reliable (the message says why)."""


def load_model(model: str | Path | InContextNet | None = None, device: str = "auto") -> InContextNet:
    """An InContextNet: as given, from a model folder, or (None) the shipped weights (cached)."""
    if isinstance(model, InContextNet):
        return model
    key = (str(Path(model).resolve()) if model is not None else "shipped", device)
    if key not in _CACHE:
        _CACHE[key] = load_incontext_model(model, device)
    return _CACHE[key]


def _as_list(x: Any, what: str) -> list[np.ndarray]:
    if x is None:
        return []
    if isinstance(x, (np.ndarray, torch.Tensor)):
        arr = np.asarray(x)
        if arr.ndim == 2:
            raise InputError(
                f"{what} is a single 2-D array", f"give a list of arrays or an [S, H, W] stack as {what}"
            )
        return list(arr)
    return [np.asarray(a) for a in x]


def _binary(label: np.ndarray, i: int) -> np.ndarray:
    lab = np.asarray(label)
    if lab.dtype == bool:
        return lab
    vals = np.unique(lab)
    if not np.all(np.isfinite(vals)):
        raise InputError(f"support label {i} has NaN/inf values", "give a binary mask (0 = background)")
    pos = vals[vals != 0]
    if len(pos) > 1 or (len(pos) == 1 and pos[0] < 0):
        shown = ", ".join(f"{v:g}" for v in vals[:6]) + (", ..." if len(vals) > 6 else "")
        raise InputError(
            f"support label {i} is not binary (values {shown})",
            "pick one structure (e.g. label == 2) or threshold a soft mask (e.g. label > 0.5)",
        )
    return lab != 0


def prepare_support(support_images: Any, support_labels: Any, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Check and resample the support: -> images [S, size, size] 0..1, labels [S, size, size] 0..1."""
    imgs, labs = _as_list(support_images, "support_images"), _as_list(support_labels, "support_labels")
    if not imgs:
        raise InputError("the support set is empty", "give at least one image with its binary label")
    if len(imgs) != len(labs):
        raise InputError(
            f"{len(imgs)} support images but {len(labs)} labels",
            "give one label per image, in the same order",
        )
    xs, ys = [], []
    for i, (im, lab) in enumerate(zip(imgs, labs, strict=True)):
        gray = to_gray(im)
        if lab.ndim != 2 or lab.shape != gray.shape:
            raise InputError(
                f"support image {i} is {tuple(gray.shape)} but its label is {tuple(lab.shape)}",
                "each label must be a 2-D mask with its image's height and width",
            )
        if not np.all(np.isfinite(gray)):
            raise InputError(f"support image {i} has NaN/inf values", "fix or drop that image")
        xs.append(to_model_grid(gray, size))
        ys.append(label_to_model_grid(_binary(lab, i).astype(np.float32), size))
    x, y = torch.stack(xs), torch.stack(ys)
    if len(imgs) == 1:
        warnings.warn(
            "a support of one example defines the task weakly; results improve with 4-16 examples",
            InContextWarning,
            stacklevel=4,
        )
    if float(y.max()) == 0:
        warnings.warn(
            "every support label is empty, so the task has no foreground and the result will be (nearly) empty",
            InContextWarning,
            stacklevel=4,
        )
    return x, y


def _check_counts(candidates: int, ensemble: int, tta: int) -> None:
    for name, v, lo in (("candidates", candidates, 1), ("ensemble", ensemble, 1), ("tta", tta, 0)):
        if not isinstance(v, (int, np.integer)) or v < lo:
            raise InputError(f"{name}={v!r}", f"{name} must be an integer >= {lo}")


def _support_runs(
    x: torch.Tensor, y: torch.Tensor, ensemble: int, tta: int, subset: int | None, seed: int
) -> list[torch.Tensor]:
    """The support variants, one per run: ensemble members (random subsets) x (original + tta copies).
    -> list of [S', 2, size, size]."""
    g = torch.Generator().manual_seed(seed)
    s = x.shape[0]
    n_sub = s if ensemble == 1 else min(s, subset or max(1, math.ceil(ENSEMBLE_FRACTION * s)))
    runs = []
    for _ in range(ensemble):
        idx = torch.arange(s) if ensemble == 1 else torch.randperm(s, generator=g)[:n_sub]
        for t in range(1 + tta):
            xe, ye = x[idx], y[idx]
            if t > 0:
                xe, ye = image_augment(xe, (ye >= 0.5).float(), g, strength=1.0)
            runs.append(torch.stack([xe, ye], 1))
    return runs


def segment_batch(
    queries: Sequence[np.ndarray] | np.ndarray,
    support_images: Any,
    support_labels: Any,
    candidates: int = 1,
    ensemble: int = 1,
    tta: int = 0,
    model: str | Path | InContextNet | None = None,
    seed: int = 0,
    subset: int | None = None,
    device: str = "auto",
    batch_size: int = 8,
    chunk: int | None = 16,
) -> list[np.ndarray]:
    """Segment several queries with one support: -> [float32 [candidates, H_i, W_i] per query].

    Same arguments as `segment`; queries is a list of 2-D arrays or an [Q, H, W] stack.
    """
    _check_counts(candidates, ensemble, tta)
    net = load_model(model, device)
    dev = next(net.parameters()).device
    size = net.spec.size
    qs = [to_gray(q) for q in list(queries)]
    if not qs:
        raise InputError("no query image", "give at least one 2-D query image")
    for i, q in enumerate(qs):
        if not np.all(np.isfinite(q)):
            raise InputError(f"query {i} has NaN/inf values", "fix the image")
    x, y = prepare_support(support_images, support_labels, size)
    runs = _support_runs(x, y, ensemble, tta, subset, seed)
    qx = torch.stack([to_model_grid(q, size) for q in qs])[:, None]  # [Q, 1, size, size]
    n_runs, k = len(runs), candidates
    owner = [[r for r in range(n_runs) if r % k == c] or [c % n_runs] for c in range(k)]
    probs = torch.zeros(len(qs), k, size, size)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        _predict_runs(net, qx, runs, owner, probs, g, dev, batch_size, chunk)
    return [_to_query_grid(probs[i], qs[i].shape) for i in range(len(qs))]


def _predict_runs(
    net: InContextNet,
    qx: torch.Tensor,
    runs: list[torch.Tensor],
    owner: list[list[int]],
    probs: torch.Tensor,
    g: torch.Generator,
    dev: torch.device,
    batch_size: int,
    chunk: int | None,
) -> None:
    """Accumulate into probs [Q, K, size, size] each candidate's mean over the runs it owns."""
    k = probs.shape[1]
    for r, sup in enumerate(runs):
        want = [c for c in range(k) if r in owner[c]]
        if not want:
            continue
        for j in range(0, len(qx), batch_size):
            q = qx[j : j + batch_size].to(dev)
            s = sup[None].expand(q.shape[0], *sup.shape).to(dev)
            p = torch.sigmoid(net(q, s, k, generator=g, chunk=chunk).float()).cpu()
            for c in want:
                probs[j : j + batch_size, c] += p[:, c] / len(owner[c])


def _to_query_grid(p: torch.Tensor, shape: tuple[int, ...]) -> np.ndarray:
    """[K, size, size] on the padded square -> float32 [K, H, W] on the query's grid."""
    h, w = shape
    m = max(h, w)
    _, (top, _, left, _) = pad_square(torch.zeros(h, w))
    up = (
        F.interpolate(p[None], size=(m, m), mode="bilinear", align_corners=False)[0]
        if m != p.shape[-1]
        else p
    )
    return up[:, top : top + h, left : left + w].clamp(0, 1).numpy().astype(np.float32)


def segment(
    query: np.ndarray,
    support_images: Any,
    support_labels: Any,
    candidates: int = 1,
    ensemble: int = 1,
    tta: int = 0,
    model: str | Path | InContextNet | None = None,
    seed: int = 0,
    subset: int | None = None,
    device: str = "auto",
) -> np.ndarray:
    """Segment `query` as the support defines the task: -> float32 [candidates, H, W] in 0..1.

    See the module docstring for the inputs, `candidates`, `ensemble`, `tta` and `subset`. Errors
    (InputError, one line): empty support, different numbers of images and labels, a label whose
    size differs from its image, a non-binary label, NaN/inf values. Warnings (InContextWarning):
    a support of one example; every support label empty.
    """
    q = np.asarray(query)
    if q.ndim == 3 and not (q.shape[-1] in (3, 4) or q.shape[0] in (1, 3, 4)):
        raise InputError(
            f"query of shape {q.shape} looks like a volume",
            "give one 2-D slice (segment_batch takes many; the CLI segments NIfTI slice by slice)",
        )
    return segment_batch(
        [q], support_images, support_labels, candidates, ensemble, tta, model, seed, subset, device
    )[0]


# ---- support folders (the CLI's --support) ----------------------------------------------------------
MASK_SUFFIX = "_mask"


def _label_of(mask: np.ndarray, label: int | None, path: Path) -> np.ndarray:
    """Integer mask -> bool: `mask == label`, or (label None) `mask > 0` when it holds one label only."""
    if label is not None:
        return mask == label
    vals = [int(v) for v in np.unique(mask) if v != 0]
    if len(vals) > 1:
        raise InputError(
            f"mask holds several labels {vals}",
            "choose the structure with --label VALUE (python: label=VALUE)",
            path,
        )
    return mask > 0


def _volume_slices(
    image: Any, mask: np.ndarray, max_slices: int
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Axial slices (canonical axis 2) of a volume with foreground, evenly spread (all if none has any)."""
    x, y = image.array[0], mask
    fg = [z for z in range(y.shape[2]) if y[:, :, z].any()] or list(range(y.shape[2]))
    keep = [fg[int(i)] for i in np.linspace(0, len(fg) - 1, min(len(fg), max_slices)).round()]
    return [x[:, :, z] for z in keep], [y[:, :, z] for z in keep]


def load_support(
    path: str | Path,
    task: str | None = None,
    site: str | None = None,
    label: int | None = None,
    max_support: int = 64,
) -> tuple[list[np.ndarray], list[np.ndarray], list[str]]:
    """Read a support set: -> (images [2-D arrays], binary labels [bool 2-D], names).

    `path` is either a folder of `NAME.ext` images with `NAME_mask.ext` masks (PNG/BMP/TIFF/NIfTI;
    NIfTI volumes give their axial slices that contain foreground), or an nnU-Net raw dataset folder
    (DatasetXXX_Name with dataset.json) with `task` (and optionally `site`): all its cases. Masks with
    several labels need `label`. At most `max_support` examples are kept (evenly spread).
    """
    from weightzoo.data.io import IMAGE2D_ENDINGS, NIFTI_ENDINGS, file_ending, read_image, read_mask

    root = Path(path)
    if not root.is_dir():
        raise InputError("support folder not found", "give a folder of NAME.ext + NAME_mask.ext pairs", root)
    images: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    names: list[str] = []

    def add(img: Any, mask: np.ndarray, name: str) -> None:
        if img.is_volume:
            xs, ys = _volume_slices(img, mask, max_support)
            images.extend(xs)
            labels.extend(ys)
            names.extend(f"{name}[z]" for _ in xs)
        else:
            images.append(to_gray(img.array))
            labels.append(mask)
            names.append(name)

    if (root / "dataset.json").exists():
        from weightzoo.data.raw import RawDataset
        from weightzoo.data.slices import load_case

        ds = RawDataset.open(root)
        if task is None:
            raise InputError(
                "a raw dataset as support needs a task", f"add --task (one of: {', '.join(ds.tasks)})", root
            )
        vals = ds.task_labels(task)
        for case in ds.cases_in(None, [site] if site else None):
            img, lab = load_case(ds, case)
            add(img, np.isin(lab, vals), case)
    else:
        ends = NIFTI_ENDINGS + IMAGE2D_ENDINGS
        files = {}
        for p in sorted(root.iterdir()):
            end = file_ending(p)
            if p.is_file() and end in ends and not p.name.startswith("."):
                files[p.name[: -len(end)]] = p
        masks = {n[: -len(MASK_SUFFIX)]: p for n, p in files.items() if n.endswith(MASK_SUFFIX)}
        imgs = {n: p for n, p in files.items() if not n.endswith(MASK_SUFFIX)}
        for stem, mpath in masks.items():
            if stem not in imgs:
                raise InputError(
                    "mask without its image", f"add {stem}.<ext> next to it, or remove the mask", mpath
                )
        for stem, ipath in imgs.items():
            if stem not in masks:
                raise InputError(
                    "support image without a mask", f"add {stem}{MASK_SUFFIX}.<ext> next to it", ipath
                )
            img = read_image(ipath)
            add(img, _label_of(read_mask(masks[stem], like=img), label, masks[stem]), stem)
        if not imgs:
            raise InputError(
                "no support images found",
                f"put NAME.png + NAME{MASK_SUFFIX}.png pairs (or NIfTI) in it",
                root,
            )
    if len(images) > max_support:
        keep = np.linspace(0, len(images) - 1, max_support).round().astype(int)
        images, labels, names = [images[i] for i in keep], [labels[i] for i in keep], [names[i] for i in keep]
    return images, labels, names
