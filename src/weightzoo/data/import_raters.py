"""Import real multi-rater data: CHASE_DB1 retinal vessels, annotated by two observers.

CHASE_DB1 (the public release, CC BY 4.0): 28 RGB fundus images `Image_NNX.jpg` (NN: child 01–14,
X: left/right eye), 999 × 960 px, each with two vessel masks, `Image_NNX_1stHO.png` and
`Image_NNX_2ndHO.png`. The first observer is the reference (labelsTr), the second one extra rater
(labelsRaters/<case>_r1, dataset.json `raters: 1`): GED and inter-rater agreement become measurable.
Subject = child (both eyes of a child share a split); one site. Images are cut into tile × tile crops at
full resolution (vessels are 1–10 px wide: resizing a whole fundus to 64 px would erase them), then
optionally resized.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from weightzoo.data.import_microscopy import tiles
from weightzoo.data.importers import _resize_2d, staged_dataset
from weightzoo.data.raw import RawDataset
from weightzoo.errors import InputError

_CHASE_IMAGE = re.compile(r"^Image_(\d\d)([LR])\.jpg$")
CHASE_LABELS = {"background": 0, "vessel": 1}
CHASE_TASKS = {"vessel": [1]}


def _read(path: Path, mode: str) -> np.ndarray:
    from PIL import Image as PILImage

    try:
        with PILImage.open(path) as im:
            return np.asarray(im.convert(mode))
    except OSError as e:
        raise InputError(f"cannot read the image ({e})", "replace the file", path) from None


def import_chasedb1(
    src: str | Path,
    out_parent: str | Path,
    tile: int = 128,
    size: int | None = None,
    dataset_id: int | None = None,
    name: str = "CHASEDB1",
    split_seed: int = 0,
) -> RawDataset:
    """CHASE_DB1 as an nnU-Net raw dataset of RGB PNG crops with two annotations per case."""
    src = Path(src)
    images = sorted(p for p in src.glob("Image_*.jpg") if _CHASE_IMAGE.match(p.name)) if src.is_dir() else []
    if not images:
        raise InputError(
            "no Image_NNX.jpg fundus images",
            "give the CHASE_DB1 folder (Image_NNX.jpg with Image_NNX_1stHO.png and _2ndHO.png)",
            src,
        )
    if tile < 16:
        raise InputError(f"--tile {tile} is too small", "use a tile of at least 16 px (default 128)")
    desc = "CHASE_DB1 retinal vessels (CC BY 4.0): reference = 1st observer, rater 1 = 2nd observer"
    with staged_dataset(
        out_parent, name, dataset_id, {"0": "R", "1": "G", "2": "B"}, CHASE_LABELS, ".png", CHASE_TASKS, desc,
        {"tile": tile},
    ) as w:  # fmt: skip
        for img_path in images:
            m = _CHASE_IMAGE.match(img_path.name)
            assert m is not None
            child, eye = m.group(1), m.group(2)
            rgb = _read(img_path, "RGB")
            masks = []
            for obs in ("1stHO", "2ndHO"):
                mpath = img_path.with_name(f"Image_{child}{eye}_{obs}.png")
                if not mpath.is_file():
                    raise InputError("observer mask not found", f"add {mpath.name} beside its image", mpath)
                mask = _read(mpath, "L")
                if mask.shape != rgb.shape[:2]:
                    raise InputError("mask and image sizes differ", "use the mask drawn on this image", mpath)
                masks.append((mask > 127).astype(np.uint8))
            stack = np.concatenate([rgb, np.stack(masks, -1)], -1)  # [H, W, 3 + 2]
            for r, c, crop in tiles(stack, tile):
                im, ref, other = crop[..., :3], crop[..., 3], crop[..., 4]
                if size is not None:
                    im = _resize_2d(im, size, False)
                    ref, other = _resize_2d(ref, size, True), _resize_2d(other, size, True)
                w.add_case(
                    f"chase{child}{eye}_t{r:02d}{c:02d}",
                    [np.moveaxis(np.asarray(im), -1, 0)],
                    ref,
                    site="chase",
                    subject=f"child{child}",
                    raters=[other],
                )
        return w.publish(split_seed)
