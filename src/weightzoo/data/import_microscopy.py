"""Import two public multi-"site" microscopy sets (AxonDeepSeg SEM/TEM, DSB 2018) as nnU-Net raw datasets.

- `import_axondeepseg`: AxonDeepSeg's SEM (rat spinal cord) and TEM (mouse corpus callosum) BIDS
  folders as ONE dataset whose sites are the modalities; labels background 0 / myelin 1 / axon 2, tasks
  axon [2], myelin [1], axonmyelin [1, 2]; subject = the BIDS `sub-` entity (a rat or a mouse).
- `import_dsb2018`: the 2018 Data Science Bowl nuclei (one instance-labelled PNG per image), binarised
  to one task `nucleus`; each image's site is its acquisition type read from its pixels (`dsb_site`).

Both images are far larger than what our networks see (600–2001 px), and the objects are small (an
axon is 10–200 px wide), so resizing a whole image to 64 px would erase them. Each image is cut into
non-overlapping `tile` x `tile` crops (centred; the border left over is dropped), and each crop is
resized to `size`. Every crop of one image keeps the image's subject, so splits never separate them.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from weightzoo.data.importers import _resize_2d, _stem, _warn, staged_dataset
from weightzoo.data.raw import RawDataset
from weightzoo.errors import InputError

AXON_MODALITIES = ("SEM", "TEM")
AXON_LABELS = {"background": 0, "myelin": 1, "axon": 2}
AXON_TASKS = {"axon": [2], "myelin": [1], "axonmyelin": [1, 2]}
_AXON_IMAGE = re.compile(r"^(sub-[A-Za-z0-9]+)_.*_(SEM|TEM)$")  # BIDS stem of a micr image
DSB_MIN_SITE = 10  # acquisition types with fewer images are pooled into '<modality>-other'


def tiles(image: np.ndarray, tile: int) -> Iterator[tuple[int, int, np.ndarray]]:
    """Non-overlapping tile x tile crops of image [H, W, ...], centred on the image.

    Yields (row, col, crop). An image smaller than `tile` on a side is one crop of its whole extent
    on that side (the resize to the network size then makes it square).
    """
    h, w = image.shape[:2]
    n_r, n_c = max(1, h // tile), max(1, w // tile)
    th, tw = min(tile, h), min(tile, w)
    r0, c0 = (h - n_r * th) // 2, (w - n_c * tw) // 2
    for r in range(n_r):
        for c in range(n_c):
            y, x = r0 + r * th, c0 + c * tw
            yield r, c, image[y : y + th, x : x + tw]


def _gray_u8(path: Path) -> np.ndarray:
    """A PNG as uint8 [H, W] (grey + alpha, or RGB, reduced to its grey channel)."""
    from PIL import Image as PILImage

    try:
        with PILImage.open(path) as im:
            return np.asarray(im.convert("L"))
    except OSError as e:
        raise InputError(f"cannot read the image ({e})", "replace the file with a valid PNG", path) from None


def _mask_u8(path: Path, like: np.ndarray) -> np.ndarray:
    """A binary mask PNG as bool [H, W] on the grid of `like`."""
    if not path.is_file():
        raise InputError(
            "mask not found for this image", f"add {path.name} (AxonDeepSeg layout)", path.parent
        )
    m = _gray_u8(path)
    if m.shape != like.shape:
        raise InputError(
            f"mask is {m.shape[1]}x{m.shape[0]} px but its image is {like.shape[1]}x{like.shape[0]}",
            "use the mask drawn on this image",
            path,
        )
    return m > 127


def _axon_images(src: Path) -> list[tuple[Path, str, str]]:
    """(image, subject, modality) for every `sub-X/micr/*_{SEM,TEM}.png` under one BIDS folder."""
    if not src.is_dir():
        raise InputError("AxonDeepSeg folder not found", "give a BIDS folder with sub-*/micr/*.png", src)
    found = []
    for p in sorted(src.glob("sub-*/micr/*.png")):
        m = _AXON_IMAGE.match(_stem(p))
        if m:
            found.append((p, m.group(1), m.group(2)))
    if not found:
        raise InputError(
            "no sub-*/micr/*_SEM.png or *_TEM.png images",
            "give an AxonDeepSeg BIDS folder (sub-*/micr/*_SEM.png or *_TEM.png, masks under derivatives/labels)",
            src,
        )
    return found


def import_axondeepseg(
    srcs: list[str | Path],
    out_parent: str | Path,
    tile: int = 256,
    size: int | None = 64,
    dataset_id: int | None = None,
    name: str = "AxonEM",
    split_seed: int = 0,
) -> RawDataset:
    """Import AxonDeepSeg BIDS folders (SEM and/or TEM) as ONE dataset with the modality as site.

    Masks are read from `derivatives/labels/sub-X/micr/<image stem>_seg-{axon,myelin}-manual.png`
    (0/255). Where both masks claim a pixel (a handful of edge pixels), axon wins; counted in one
    DataWarning. Cases are `<subject>_<sample>_t<row><col>` crops (module docstring).
    """
    if tile < 16:
        raise InputError(f"--tile {tile} is too small", "use a tile of at least 16 px (default 256)")
    desc = "AxonDeepSeg SEM (rat spinal cord) and TEM (mouse corpus callosum), MIT; modality as site"
    extra: dict[str, Any] = {"tile": tile, "source_pixel_size_um": {}}  # {modality: sorted sizes}
    n_overlap = 0
    with staged_dataset(
        out_parent, name, dataset_id, {"0": "EM"}, AXON_LABELS, ".png", AXON_TASKS, desc, extra
    ) as w:
        for src in map(Path, srcs):
            for img_path, subject, modality in _axon_images(src):
                stem = _stem(img_path)
                img = _gray_u8(img_path)
                lab_dir = src / "derivatives" / "labels" / subject / "micr"
                axon = _mask_u8(lab_dir / f"{stem}_seg-axon-manual.png", img)
                myelin = _mask_u8(lab_dir / f"{stem}_seg-myelin-manual.png", img)
                n_overlap += int((axon & myelin).sum())
                label = np.where(axon, 2, np.where(myelin, 1, 0)).astype(np.uint8)
                sizes = w.meta["source_pixel_size_um"].setdefault(modality, [])
                if (px := _pixel_size(img_path)) is not None and px not in sizes:
                    sizes.append(px)
                    sizes.sort()
                sample = stem[len(subject) + 1 : -len(modality) - 1]
                for r, c, crop in tiles(np.stack([img, label], -1), tile):
                    im, lab = crop[..., 0], crop[..., 1]
                    if size is not None:
                        im, lab = _resize_2d(im, size, False), _resize_2d(lab, size, True)
                    case = f"{subject}_{sample}_t{r}{c}".replace("-", "")
                    w.add_case(case, [im], lab, site=modality, subject=subject)
        if n_overlap:
            _warn(w.notes, f"{n_overlap} pixels marked both axon and myelin were labelled axon")
        return w.publish(split_seed)


def _pixel_size(img_path: Path) -> float | None:
    """The BIDS sidecar's PixelSize (µm), from `<stem>.json` or the subject-level `sub-X_<mod>.json`."""
    import json

    stem = _stem(img_path)
    for cand in (img_path.with_name(stem + ".json"), *sorted(img_path.parent.glob("*.json"))):
        try:
            return float(json.loads(cand.read_text())["PixelSize"][0])
        except (OSError, ValueError, KeyError, IndexError, TypeError):
            continue
    return None


# ---- 2018 Data Science Bowl nuclei ---------------------------------------------------------------
def dsb_modality(rgb: np.ndarray) -> str:
    """'fluo' (grey, dark background), 'bright' (grey, light background) or 'stained' (colour).

    rgb uint8 [H, W, 3]. The three imaging families of the DSB 2018 paper (Caicedo et al. 2019),
    told apart by whether the channels are equal and by the median brightness.
    """
    a = rgb.astype(np.int16)
    grey = bool(np.abs(a[..., 0] - a[..., 1]).max() <= 1 and np.abs(a[..., 1] - a[..., 2]).max() <= 1)
    dark = float(np.median(a.mean(-1))) < 100
    return ("fluo" if dark else "bright") if grey else "stained"


def dsb_site(rgb: np.ndarray) -> str:
    """Acquisition type of one DSB image: modality and image size, e.g. 'fluo-256x256'.

    The set has no experiment labels; within one modality, the image size tells the instruments and
    experiments apart (the 334 256x256 fluorescence images, the 90 520x696 ones, ...).
    """
    return f"{dsb_modality(rgb)}-{rgb.shape[0]}x{rgb.shape[1]}"


def import_dsb2018(
    src: str | Path,
    out_parent: str | Path,
    tile: int = 256,
    size: int | None = 64,
    per_site: int | None = None,
    dataset_id: int | None = None,
    name: str = "DSB2018",
    split_seed: int = 0,
) -> RawDataset:
    """Import the DSB 2018 nuclei (`images/ID.png` RGB, `labels/ID.png` uint16 instances) as one
    binary task `nucleus` with the acquisition type as site (`dsb_site`; types with fewer than
    DSB_MIN_SITE images pooled into '<modality>-other'). `per_site` takes the first N images (sorted by
    id) of each site. Subject = image id. Note: the DSB images carry no subject or experiment ids, so
    crops of one slide in different images may fall into different splits.
    """
    from PIL import Image as PILImage

    src = Path(src)
    img_dir, lab_dir = src / "images", src / "labels"
    if not img_dir.is_dir() or not lab_dir.is_dir():
        raise InputError("no images/ and labels/ folders inside", "give the dsb2018_nuclei folder", src)
    if tile < 16:
        raise InputError(f"--tile {tile} is too small", "use a tile of at least 16 px (default 256)")
    paths = sorted(img_dir.glob("*.png"))
    if not paths:
        raise InputError("no PNG images in images/", "give the dsb2018_nuclei folder", img_dir)
    sites: dict[Path, str] = {}
    for p in paths:
        with PILImage.open(p) as im:
            sites[p] = dsb_site(np.asarray(im.convert("RGB")))
    counts = Counter(sites.values())
    site_of = {p: s if counts[s] >= DSB_MIN_SITE else s.split("-")[0] + "-other" for p, s in sites.items()}
    taken: Counter[str] = Counter()
    desc = "2018 Data Science Bowl nuclei (BBBC038v1, CC0); acquisition type (modality x size) as site"
    labels = {"background": 0, "nucleus": 1}
    with staged_dataset(
        out_parent,
        name,
        dataset_id,
        {"0": "R", "1": "G", "2": "B"},
        labels,
        ".png",
        {"nucleus": [1]},
        desc,
        {"tile": tile},
    ) as w:
        for p in paths:
            site = site_of[p]
            if per_site is not None and taken[site] >= per_site:
                continue
            taken[site] += 1
            lab_path = lab_dir / p.name
            if not lab_path.is_file():
                raise InputError("label image not found", f"add labels/{p.name} (uint16 instances)", p)
            with PILImage.open(p) as im:
                rgb = np.asarray(im.convert("RGB"))
            with PILImage.open(lab_path) as im:
                lab = (np.asarray(im) > 0).astype(np.uint8)
            if lab.shape != rgb.shape[:2]:
                raise InputError(
                    "label and image sizes differ", "use the label drawn on this image", lab_path
                )
            case_id = _stem(p)  # the full id: truncating could merge two images
            for r, c, crop in tiles(np.concatenate([rgb, lab[..., None]], -1), tile):
                im3, m = np.ascontiguousarray(crop[..., :3]), np.ascontiguousarray(crop[..., 3])
                if size is not None:
                    im3, m = _resize_2d(im3, size, False), _resize_2d(m, size, True)
                w.add_case(f"dsb_{case_id}_t{r}{c}", [np.moveaxis(im3, -1, 0)], m, site=site, subject=case_id)
        return w.publish(split_seed)
