"""Import real data into standard nnU-Net raw datasets (with weightzoo's sites/subjects/tasks keys).

- `import_wbc`: the white-blood-cell data set (two sources = two sites; RGB PNG; 3 labels).
- `import_nifti_folder`: SCT/BIDS-style folders, image `X.nii.gz` + mask `X<suffix>.nii.gz`.
- `import_folder`: any folder of images + masks (PNG/BMP/TIFF/NIfTI), same pairing rules.

Every import is written into a hidden staging folder next to its destination and renamed into place
only when complete, so a failed import leaves nothing behind and two imports are never mixed: an
existing dataset id is an error, and `dataset_id=None` takes the next free id (>= 501).
Problems that do not stop an import (stray mask values, empty masks, images without a mask) are
reported as ONE `DataWarning` per kind, with counts, and recorded in dataset.json under `import_notes`.
"""

from __future__ import annotations

import csv
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from weightzoo.data.io import (
    IMAGE2D_ENDINGS,
    NIFTI_ENDINGS,
    Image,
    check_same_grid,
    file_ending,
    read_image,
    to_original_orientation,
)
from weightzoo.data.raw import DATASET_DIR_RE, RawDataset, RawDatasetWriter, next_dataset_id
from weightzoo.errors import InputError, WeightzooWarning

WBC_CLASSES = np.array([0, 128, 255])  # mask grey values: background, cytoplasm, nucleus
WBC_SITES = {"Dataset 1": ("Dataset1", "wbc1"), "Dataset 2": ("Dataset2", "wbc2")}
EMPTY_POLICIES = ("keep", "skip", "error")
_BIDS_SUB = re.compile(r"(?:^|[/_\\])(sub-[A-Za-z0-9]+)")


class DataWarning(WeightzooWarning):
    """Something in the input was repaired or skipped during an import (counts in the message)."""


def _warn(notes: list[str], msg: str) -> None:
    notes.append(msg)
    warnings.warn(msg, DataWarning, stacklevel=3)


# ---- staging: a dataset appears complete or not at all -------------------------------------------
class StagedDataset:
    """A RawDatasetWriter writing into a staging folder; `publish()` finishes it and moves it in place."""

    def __init__(self, writer: RawDatasetWriter, final_root: Path):
        self.writer, self.final_root = writer, final_root
        self.notes: list[str] = []

    @property
    def meta(self) -> dict[str, Any]:
        return self.writer.meta

    def add_case(self, *args: Any, **kwargs: Any) -> None:
        self.writer.add_case(*args, **kwargs)

    def publish(self, split_seed: int = 0) -> RawDataset:
        if not self.writer.meta["subjects"]:
            raise InputError(
                "no cases to write", "check the input folder and options", self.final_root.parent
            )
        if self.notes:
            self.writer.meta["import_notes"] = list(self.notes)
        _check_free(
            self.final_root.parent, int(self.final_root.name[7:10])
        )  # another import may have raced us
        self.writer.finish(split_seed)
        os.replace(self.writer.root, self.final_root)
        return RawDataset.open(self.final_root)


def _check_free(parent: Path, dataset_id: int) -> None:
    for d in parent.iterdir() if parent.is_dir() else []:
        m = DATASET_DIR_RE.match(d.name)
        if m and int(m.group(1)) == dataset_id:
            raise InputError(
                f"dataset id {dataset_id:03d} is already used by {d.name}",
                "choose another id (or none, for the next free one), or move that dataset away",
                d,
            )


@contextmanager
def staged_dataset(
    out_parent: str | Path,
    name: str,
    dataset_id: int | None,
    channel_names: dict[str, str],
    labels: dict[str, Any],
    file_ending: str,
    tasks: dict[str, list[int]],
    description: str = "",
    extra: dict[str, Any] | None = None,
) -> Iterator[StagedDataset]:
    """Context manager yielding a StagedDataset for `out_parent/DatasetXXX_<name>`; call `.publish()`
    inside the block. Whatever happens, the staging folder is removed on exit."""
    parent = Path(out_parent)
    if parent.exists() and not parent.is_dir():
        raise InputError("output location is a file", "give a folder to create datasets in", parent)
    parent.mkdir(parents=True, exist_ok=True)
    dataset_id = next_dataset_id(parent) if dataset_id is None else int(dataset_id)
    _check_free(parent, dataset_id)
    stage = Path(tempfile.mkdtemp(prefix=f".staging-{name}-", dir=parent))
    try:
        writer = RawDatasetWriter(
            stage, dataset_id, name, channel_names, labels, file_ending, tasks, description, extra
        )
        yield StagedDataset(writer, parent / writer.root.name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _safe_name(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_\-]+", "_", s).strip("_") or "data"


def _stem(path: Path) -> str:
    return path.name[: -len(file_ending(path))]


# ---- white blood cells ---------------------------------------------------------------------------
def _wbc_cell_types(src: Path, folder: str) -> dict[str, int]:
    """{image number '001': cell type} from 'Class Labels of Dataset N.csv' (absent: empty)."""
    path = src / f"Class Labels of {folder}.csv"
    if not path.exists():
        return {}
    out = {}
    with path.open(newline="") as f:
        for row in csv.reader(f):
            if len(row) >= 2 and row[0].strip().isdigit() and row[1].strip().isdigit():
                out[f"{int(row[0]):03d}"] = int(row[1])
    return out


def map_to_nearest(mask: np.ndarray, values: Sequence[int]) -> tuple[np.ndarray, int]:
    """Map each pixel to the index of the nearest of `values` (ties: the lower); also count the pixels
    whose value was not exactly one of them. mask [...] -> (uint8 indices [...], n_stray)."""
    vals = np.asarray(values, dtype=np.float32)
    idx = np.abs(mask.astype(np.float32)[..., None] - vals).argmin(-1).astype(np.uint8)
    return idx, int((~np.isin(mask, vals)).sum())


def _resize_2d(img: np.ndarray, size: int, nearest: bool) -> np.ndarray:
    """uint8 [H, W] or [H, W, 3] -> [size, size] with Pillow (bilinear, or nearest for masks)."""
    from PIL import Image as PILImage

    res = PILImage.NEAREST if nearest else PILImage.BILINEAR
    return np.asarray(PILImage.fromarray(img).resize((size, size), res))


def import_wbc(
    src: str | Path,
    out_parent: str | Path,
    size: int | None = None,
    limit: int | None = None,
    dataset_id: int | None = None,
    name: str = "WBC",
    split_seed: int = 0,
) -> RawDataset:
    """Import the white-blood-cell data set as ONE dataset with two sites.

    `src` holds 'Dataset 1/' and/or 'Dataset 2/' (NNN.bmp RGB image + NNN.png mask: 0 background,
    128 cytoplasm, 255 nucleus). Output: RGB PNG cases `wbc1_001`, `wbc2_001`, ... (subject = case),
    sites 'Dataset1'/'Dataset2', labels background 0 / cytoplasm 1 / nucleus 2, tasks nucleus [2],
    cell [1, 2], cytoplasm [1]; cell types from the CSVs under the dataset.json key `cell_types`.
    `size` resizes every image to size x size (None keeps 120 / 300 px); `limit` takes the first N
    images of each source. Stray mask values go to the nearest class, with one DataWarning.
    """
    src = Path(src)
    if not src.is_dir():
        raise InputError(
            "WBC folder not found", "give the folder that holds 'Dataset 1' and 'Dataset 2'", src
        )
    folders = [f for f in WBC_SITES if (src / f).is_dir()]
    if not folders:
        raise InputError(
            "no 'Dataset 1' or 'Dataset 2' folder inside", "give the segmentation_WBC root folder", src
        )
    labels = {"background": 0, "cytoplasm": 1, "nucleus": 2}
    tasks = {"nucleus": [2], "cell": [1, 2], "cytoplasm": [1]}
    desc = "White blood cells (segmentation_WBC, GPL-3.0); two acquisition sources as sites"
    cell_types: dict[str, int] = {}
    stray: dict[str, tuple[int, int]] = {}
    with staged_dataset(
        out_parent, name, dataset_id, {"0": "R", "1": "G", "2": "B"}, labels, ".png", tasks, desc
    ) as w:
        for folder in folders:
            site, prefix = WBC_SITES[folder]
            types = _wbc_cell_types(src, folder)
            images = sorted(p for p in (src / folder).iterdir() if p.suffix.lower() == ".bmp")
            if not images:
                raise InputError("no .bmp images", "expected NNN.bmp images with NNN.png masks", src / folder)
            n_px = n_files = 0
            for img_path in images[:limit]:
                mask_path = img_path.with_suffix(".png")
                if not mask_path.exists():
                    raise InputError(
                        "mask not found for this image", f"add {mask_path.name} next to it", img_path
                    )
                image, mask = read_image(img_path), read_image(mask_path)
                check_same_grid(image, mask, mask_path)
                if image.array.shape[0] != 3:
                    raise InputError(
                        f"expected an RGB image, got {image.array.shape[0]} channel(s)",
                        "use the original BMP files",
                        img_path,
                    )
                label, n_bad = map_to_nearest(mask.array.max(0), WBC_CLASSES)
                n_px, n_files = n_px + n_bad, n_files + (n_bad > 0)
                rgb = np.moveaxis(image.array, 0, -1).astype(np.uint8)  # [H, W, 3]
                if size is not None:
                    rgb, label = _resize_2d(rgb, size, False), _resize_2d(label, size, True)
                case = f"{prefix}_{_stem(img_path)}"
                w.add_case(
                    case, [np.moveaxis(rgb, -1, 0)], label, site=site, subject=case
                )  # write_2d: [C, H, W]
                if _stem(img_path) in types:
                    cell_types[case] = types[_stem(img_path)]
            if n_px:
                stray[site] = (n_px, n_files)
        if stray:
            parts = "; ".join(f"{s}: {px} pixels in {nf} masks" for s, (px, nf) in stray.items())
            _warn(w.notes, f"WBC masks with values outside 0/128/255 mapped to the nearest class ({parts})")
        if cell_types:
            w.meta["cell_types"] = cell_types
        return w.publish(split_seed)


# ---- generic image + mask folders ----------------------------------------------------------------
def _pairs(
    src: Path, mask_suffix: str, endings: Sequence[str], strict: bool, notes: list[str]
) -> list[tuple[Path, Path]]:
    """(image, mask) pairs under `src` (recursive). A mask is `<image stem><mask_suffix><ending>`, in
    the image's folder or, BIDS-derivatives style, anywhere under `src`. Files under a `derivatives`
    folder are never taken as images."""
    files = sorted(
        p
        for p in src.rglob("*")
        if p.is_file()
        and file_ending(p) in endings
        and not any(part.startswith(".") for part in p.relative_to(src).parts)
    )
    masks: dict[str, list[Path]] = {}
    images = []
    for p in files:
        stem = _stem(p)
        if stem.endswith(mask_suffix):
            masks.setdefault(stem[: -len(mask_suffix)], []).append(p)
        elif "derivatives" not in p.relative_to(src).parts[:-1]:
            images.append(p)
    pairs, unpaired = [], []
    for img in images:
        cands = masks.get(_stem(img), [])
        same_dir = [m for m in cands if m.parent == img.parent]
        cands = same_dir or cands
        if len(cands) > 1:
            raise InputError(
                f"several masks match this image: {', '.join(str(c.relative_to(src)) for c in cands)}",
                "keep one mask per image (or one in the image's own folder)",
                img,
            )
        if not cands:
            if strict:
                raise InputError(
                    f"no mask '{_stem(img)}{mask_suffix}<ext>' for this image",
                    "add the mask, fix --mask-suffix, or drop --strict",
                    img,
                )
            unpaired.append(img)
            continue
        pairs.append((img, cands[0]))
    if not pairs:
        found = ", ".join(p.name for p in files[:5]) or "no image files"
        raise InputError(
            f"no image/mask pairs with mask suffix '{mask_suffix}' (found: {found})",
            "check the folder and --mask-suffix (e.g. _seg-manual, _label-SC_seg, _mask)",
            src,
        )
    if unpaired:
        names = ", ".join(p.name for p in unpaired[:5]) + (", ..." if len(unpaired) > 5 else "")
        _warn(
            notes,
            f"{len(unpaired)} image(s) without a '{mask_suffix}' mask skipped: {names} "
            "(strict mode, --strict, makes this an error)",
        )
    image_stems = {_stem(p) for p in images}
    orphans = sorted(m.name for base, ms in masks.items() if base not in image_stems for m in ms)
    if orphans:
        _warn(notes, f"{len(orphans)} mask(s) without an image ignored: {', '.join(orphans[:5])}")
    return pairs


def bids_subject(path: Path, root: Path) -> str | None:
    """The BIDS `sub-XXX` entity in `path` (relative to `root`), if any."""
    m = _BIDS_SUB.search(str(path.relative_to(root)))
    return m.group(1) if m else None


def _binary_mask(mask: Image, path: Path, notes_soft: list[str]) -> np.ndarray:
    """Mask array (canonical [X,Y,Z] or [H,W]) -> uint8 0/1: > 0 for label maps, >= 0.5 for soft masks."""
    arr = mask.array[0] if mask.is_volume or mask.array.shape[0] == 1 else mask.array.max(0)
    if np.allclose(arr, np.round(arr)):
        return (arr > 0).astype(np.uint8)
    notes_soft.append(path.name)
    return (arr >= 0.5).astype(np.uint8)


def import_folder(
    src: str | Path,
    out_parent: str | Path,
    mask_suffix: str = "_mask",
    task: str = "mask",
    site: str = "default",
    *,
    name: str | None = None,
    dataset_id: int | None = None,
    empty: str = "keep",
    strict: bool = False,
    site_by_folder: bool = False,
    limit: int | None = None,
    split_seed: int = 0,
    endings: Sequence[str] = NIFTI_ENDINGS + IMAGE2D_ENDINGS,
) -> RawDataset:
    """Import a folder (searched recursively) of images `X.ext` with masks `X<mask_suffix>.ext`.

    Each mask must lie on its image's grid (shape, and affine for NIfTI; error naming the mask) and is
    binarised (> 0; soft masks >= 0.5) into label 1 named `task`. Images without a mask are skipped
    with one DataWarning (`strict=True`: error). Empty masks: `empty='keep'` (default; right for
    lesion-like tasks), 'skip', or 'error'; counted in one DataWarning either way.
    NIfTI is written as .nii.gz in the image's own orientation and affine; 2-D images as PNG (TIFF
    when the sources are TIFF, to keep their range). Subject = BIDS `sub-XXX` entity of the path, else
    the case id. Site = `site`, or with `site_by_folder` the first sub-folder of `src` holding the image.
    """
    src = Path(src)
    if not src.is_dir():
        raise InputError("input folder not found", "give the folder that holds the images and masks", src)
    if not mask_suffix:
        raise InputError(
            "empty mask suffix", "give the suffix that tells masks from images, e.g. _mask or _seg-manual"
        )
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_\-]*", task) or task == "background":
        raise InputError(
            f"task name {task!r} is not usable",
            "use letters, digits, _ or -, starting with a letter (not 'background')",
        )
    if empty not in EMPTY_POLICIES:
        raise InputError(f"empty={empty!r}", f"choose one of {', '.join(EMPTY_POLICIES)}")
    notes: list[str] = []
    pairs = _pairs(src, mask_suffix, endings, strict, notes)[:limit]
    kinds = {file_ending(p) in NIFTI_ENDINGS for p, _ in pairs}
    if len(kinds) > 1:
        raise InputError("the folder mixes NIfTI volumes and 2-D images", "import them separately", src)
    volumes = kinds == {True}
    if volumes:
        ending = ".nii.gz"
    else:
        ending = ".tif" if any(file_ending(p) in (".tif", ".tiff") for p, _ in pairs) else ".png"

    first = read_image(pairs[0][0])
    n_ch = first.array.shape[0]
    if volumes:
        channels = {"0": "MRI"}
    elif n_ch == 3:
        channels = {"0": "R", "1": "G", "2": "B"}
    elif n_ch == 1:
        channels = {"0": "gray"}
    else:
        raise InputError(f"{n_ch}-channel 2-D image", "use gray or RGB images", pairs[0][0])
    desc = f"Imported from {src.name} (mask suffix {mask_suffix})"
    soft: list[str] = []
    empties: list[str] = []
    used: set[str] = set()
    with staged_dataset(
        out_parent,
        _safe_name(name or src.name),
        dataset_id,
        channels,
        {"background": 0, task: 1},
        ending,
        {task: [1]},
        desc,
    ) as w:
        w.notes.extend(notes)
        for img_path, mask_path in pairs:
            image = first if img_path == pairs[0][0] else read_image(img_path)
            if file_ending(mask_path) in NIFTI_ENDINGS and not volumes:
                raise InputError(
                    "NIfTI mask for a 2-D image", "give the mask in the image's format", mask_path
                )
            mask = read_image(mask_path)
            if volumes and not mask.is_volume:
                raise InputError(
                    "2-D mask for a NIfTI image", "give the mask as NIfTI on the image's grid", mask_path
                )
            check_same_grid(image, mask, mask_path)
            if image.array.shape[0] != n_ch:
                raise InputError(
                    f"image has {image.array.shape[0]} channel(s), {pairs[0][0].name} has {n_ch}",
                    "convert all images to gray or all to RGB",
                    img_path,
                )
            binary = _binary_mask(mask, mask_path, soft)
            if not binary.any():
                if empty == "error":
                    raise InputError(
                        "mask is empty",
                        "fix it, or import with --empty skip or keep (empty='skip'/'keep')",
                        mask_path,
                    )
                empties.append(mask_path.name)
                if empty == "skip":
                    continue
            case = base = _safe_name(_stem(img_path))
            k = 2
            while case in used:  # same file name in two folders
                case, k = f"{base}_{k}", k + 1
            used.add(case)
            rel = img_path.relative_to(src).parts
            case_site = rel[0] if site_by_folder and len(rel) > 1 else site
            subject = bids_subject(img_path, src) or case
            if volumes:
                nii = image._nifti  # write in the image's own orientation/affine: the import is lossless
                data = np.asarray(nii.get_fdata(dtype=np.float32)).reshape(nii.shape[:3])
                lab = to_original_orientation(image, binary)
                w.add_case(case, [data], lab, site=case_site, subject=subject, affine=nii.affine)
            else:
                arr = (
                    image.array
                    if ending == ".tif"
                    else np.clip(np.round(image.array), 0, 255).astype(np.uint8)
                )
                w.add_case(case, [arr], binary, site=case_site, subject=subject)
        if soft:
            _warn(
                w.notes, f"{len(soft)} soft (non-integer) mask(s) thresholded at 0.5: {', '.join(soft[:5])}"
            )
        if empties:
            action = "skipped" if empty == "skip" else "kept (empty foreground)"
            _warn(w.notes, f"{len(empties)} empty mask(s) {action}: {', '.join(empties[:5])}")
        return w.publish(split_seed)


def import_nifti_folder(
    src: str | Path,
    out_parent: str | Path,
    mask_suffix: str = "_seg-manual",
    task: str = "cord",
    site: str = "default",
    **kwargs: Any,
) -> RawDataset:
    """SCT/BIDS-style NIfTI import: `X.nii.gz` + `X<mask_suffix>.nii.gz` (e.g. `_seg-manual`, or
    `_label-SC_seg` for masks under derivatives/labels/). Other options as in `import_folder`."""
    return import_folder(src, out_parent, mask_suffix, task, site, endings=NIFTI_ENDINGS, **kwargs)
