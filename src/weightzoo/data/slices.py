"""From cases to 2-D training/evaluation slices: normalise per case, slice, resize. The `SliceSet`.

Every route (training, zoo, generators, heads, in-context) consumes the same SliceSet, so they are
compared on identical inputs. Preprocessing is described by a JSON-able `Preprocessing`, stored in
each model folder, so `segment` applies exactly what training saw.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from weightzoo.data.io import Image, read_image, read_mask
from weightzoo.data.raw import RawDataset
from weightzoo.errors import InputError, UnknownNameError

NORMALIZATIONS = ("zscore", "percentile", "rgb")


MAX_SIZE = 4096  # slice side in pixels
MAX_CHANNELS = 64


@dataclass(frozen=True)
class Preprocessing:
    """How raw intensities become network input. Stored in model.json."""

    normalization: str = "zscore"  # zscore | percentile | rgb (divide by 255, as nnU-Net for natural images)
    size: tuple[int, int] = (64, 64)  # in-plane size every slice is resized to
    axis: int = 2  # canonical (RAS) axis volumes are sliced along: 2 = axial
    channels: int = 1
    # 3-D models: size is the patch in the NIfTI's voxel axes [i, j, k], and `pipeline` is the
    # weightzoo.volume.preprocess.VolumePipeline (nnU-Net's preprocessing and sliding window) as a dict
    dims: int = 2
    pipeline: dict[str, Any] | None = field(default=None, compare=False, hash=False)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["size"] = list(self.size)
        if self.dims == 2:  # 2-D model folders stay exactly as they were
            d.pop("dims")
            d.pop("pipeline")
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str | Path | None = None) -> Preprocessing:
        unknown = set(d) - {"normalization", "size", "axis", "channels", "dims", "pipeline"}
        if unknown:
            raise InputError(
                f"unknown preprocessing keys {sorted(unknown)}", "remove them from the file", source
            )
        try:
            size = tuple(int(v) for v in d.get("size", (64, 64)))
            axis, channels, dims = int(d.get("axis", 2)), int(d.get("channels", 1)), int(d.get("dims", 2))
        except (TypeError, ValueError):
            raise InputError(
                "preprocessing size/axis/channels/dims are not integers",
                "fix the file's preprocessing",
                source,
            ) from None
        pipeline = d.get("pipeline")
        if dims not in (2, 3) or (dims == 3) != isinstance(pipeline, dict):
            raise InputError(
                f"preprocessing dims {dims} with {'a' if isinstance(pipeline, dict) else 'no'} 3-D pipeline",
                "a 2-D model has dims 2 (or none) and no pipeline; a 3-D one dims 3 and its pipeline",
                source,
            )
        norm = d.get("normalization", "zscore")
        if norm not in NORMALIZATIONS:
            raise UnknownNameError("normalization", str(norm), NORMALIZATIONS, source)
        # caps, checked before anything is allocated: [1000000, 1000000] used to try 16 TB
        if len(size) != dims or not all(1 <= v <= MAX_SIZE for v in size):
            raise InputError(
                f"preprocessing size {list(size)} is not {dims} sides (H, W or a 3-D patch) in [1, {MAX_SIZE}]",
                "fix the file's preprocessing",
                source,
            )
        if axis not in (0, 1, 2) or not 1 <= channels <= MAX_CHANNELS:
            raise InputError(
                f"preprocessing axis {axis} / channels {channels} out of range (axis 0-2, 1-{MAX_CHANNELS} channels)",
                "fix the file's preprocessing",
                source,
            )
        if pipeline is not None:
            from weightzoo.volume.preprocess import VolumePipeline

            VolumePipeline.from_dict(pipeline, source)  # checked now, with the file named
        return cls(norm, size, axis, channels, dims, pipeline)


def normalize_case(array: np.ndarray, method: str) -> np.ndarray:
    """Normalise a whole case ([C, ...]) channel by channel; slices of a volume share statistics."""
    if method not in NORMALIZATIONS:
        raise UnknownNameError("normalization", method, NORMALIZATIONS)
    out = np.empty_like(array, dtype=np.float32)
    for c in range(array.shape[0]):
        x = array[c].astype(np.float32)
        if method == "zscore":
            out[c] = (x - x.mean()) / max(float(x.std()), 1e-8)
        elif method == "percentile":
            lo, hi = np.percentile(x, [0.5, 99.5])
            out[c] = np.clip((x - lo) / max(float(hi - lo), 1e-8), 0.0, 1.0)
        else:
            out[c] = x / 255.0
    return out


def case_slices(array: np.ndarray, axis: int, is_volume: bool) -> np.ndarray:
    """[C, X, Y, Z] volume -> [S, C, h, w] slices along canonical `axis`; a 2-D [C, H, W] -> [1, C, H, W]."""
    if not is_volume:
        return array[None]
    return np.moveaxis(array, axis + 1, 0)


def mask_slices(mask: np.ndarray, axis: int, is_volume: bool) -> np.ndarray:
    """[X, Y, Z] -> [S, h, w]; [H, W] -> [1, H, W]."""
    return np.moveaxis(mask, axis, 0) if is_volume else mask[None]


def resize(x: np.ndarray | torch.Tensor, size: Sequence[int], mode: str = "bilinear") -> torch.Tensor:
    """Resize [N, C, h, w] to [N, C, *size]; `mode='nearest'` for label maps."""
    t = torch.as_tensor(x, dtype=torch.float32)
    if tuple(t.shape[-2:]) == tuple(size):
        return t
    if mode == "nearest":
        return F.interpolate(t, size=tuple(size), mode="nearest-exact")
    return F.interpolate(t, size=tuple(size), mode="bilinear", align_corners=False, antialias=True)


def binary_task_masks(label: np.ndarray, task_labels: Sequence[Sequence[int]]) -> np.ndarray:
    """Integer label map [...] -> uint8 [T, ...], one binary channel per task (region-style)."""
    return np.stack([np.isin(label, list(vals)) for vals in task_labels]).astype(np.uint8)


@dataclass
class SliceSet:
    """2-D slices ready for a network.

    images: float32 [N, C, H, W] (normalised per case, resized)
    labels: uint8   [N, T, H, W] one binary channel per task in `tasks`
    meta:   per-slice dicts {case, subject, site, slice}
    """

    images: np.ndarray
    labels: np.ndarray
    tasks: list[str]
    meta: list[dict[str, Any]] = field(default_factory=list)
    preprocessing: Preprocessing = field(default_factory=Preprocessing)

    def __len__(self) -> int:
        return len(self.images)

    def select(self, idx: Sequence[int] | np.ndarray) -> SliceSet:
        idx = np.asarray(idx, dtype=int)
        return SliceSet(
            self.images[idx],
            self.labels[idx],
            list(self.tasks),
            [self.meta[i] for i in idx],
            self.preprocessing,
        )

    def where(self, **kv: Any) -> SliceSet:
        """Slices whose meta matches all of kv, e.g. `where(site="A")`."""
        return self.select([i for i, m in enumerate(self.meta) if all(m.get(k) == v for k, v in kv.items())])

    def cases(self) -> list[str]:
        return sorted({m["case"] for m in self.meta})

    def sites(self) -> list[str]:
        return sorted({m["site"] for m in self.meta})


def load_case(ds: RawDataset, case: str, rater: int = 0) -> tuple[Image, np.ndarray]:
    """Read a case: image (all channels stacked [C, ...]) and its label map (annotation `rater`: 0 is
    labelsTr), grids checked."""
    files = ds.image_files(case)
    first = read_image(files[0])
    arrays = [first.array]
    for f in files[1:]:
        other = read_image(f)
        from weightzoo.data.io import check_same_grid

        check_same_grid(first, other, f)
        arrays.append(other.array)
    first.array = np.concatenate(arrays, 0)
    label = read_mask(ds.rater_label_file(case, rater), like=first)
    return first, label


def load_slices(
    ds: RawDataset,
    tasks: Sequence[str],
    split: str | None = None,
    sites: Iterable[str] | None = None,
    prep: Preprocessing | None = None,
    cases: Sequence[str] | None = None,
    rater: int = 0,
) -> SliceSet:
    """All slices of the dataset's cases in `split` (by subject) and `sites`, for binary `tasks`
    (labels of annotation `rater`: 0 = labelsTr, k = labelsRaters/<case>_r<k>)."""
    prep = prep or Preprocessing(channels=ds.n_channels)
    task_vals = [ds.task_labels(t) for t in tasks]
    chosen = list(cases) if cases is not None else ds.cases_in(split, sites)
    if not chosen:
        raise InputError(
            f"no cases in split={split} sites={list(sites) if sites else 'all'}",
            "check the dataset's splits and sites",
            ds.root,
        )
    imgs, labs, meta = [], [], []
    for case in chosen:
        image, label = load_case(ds, case, rater)
        if image.array.shape[0] != prep.channels:
            raise InputError(
                f"case has {image.array.shape[0]} channels, the model expects {prep.channels}",
                "use a dataset with the channels the model was trained on",
                ds.image_files(case)[0],
            )
        x = case_slices(normalize_case(image.array, prep.normalization), prep.axis, image.is_volume)
        y = binary_task_masks(mask_slices(label, prep.axis, image.is_volume), task_vals)  # [T, S, h, w]
        y = np.moveaxis(y, 0, 1)  # [S, T, h, w]
        imgs.append(resize(x, prep.size).numpy())
        labs.append((resize(y, prep.size, "bilinear") >= 0.5).to(torch.uint8).numpy())
        for s in range(x.shape[0]):
            meta.append({"case": case, "subject": ds.subject(case), "site": ds.site(case), "slice": s})
    return SliceSet(np.concatenate(imgs), np.concatenate(labs), list(tasks), meta, prep)
