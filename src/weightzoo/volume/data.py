"""From an nnU-Net raw dataset to 3-D training volumes, preprocessed exactly as nnU-Net's 3d_fullres.

`training_pipeline` plans the preprocessing of one of our 3-D runs as nnU-Net would export it
(weightzoo.zoo.nnunet's plans and dataset.json, read back through `VolumePipeline.from_plans`), so a
model trained here and exported predicts the same in nnU-Net and in weightzoo: target spacing = the
training cases' median (or the config's), z-score normalisation, nnU-Net's resampling rules, no
transposition (patch and spacing in nnU-Net's [z, y, x] order), mirroring on every axis.

`load_volumes` reads cases into a `VolumeSet` through the same `preprocess_case` that inference
uses; labels become one binary mask per task.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from weightzoo.data.io import Image, to_original_orientation
from weightzoo.data.raw import RawDataset
from weightzoo.data.slices import Preprocessing, binary_task_masks, load_case
from weightzoo.errors import InputError
from weightzoo.nets.unet import ArchSpec
from weightzoo.volume.patches import VolumeSet
from weightzoo.volume.preprocess import VolumePipeline, preprocess_case, read_nnunet_order

if TYPE_CHECKING:
    from weightzoo.train.config import TrainConfig

CONFIGURATION = "3d_fullres"
# our Preprocessing.normalization -> nnU-Net's scheme, for 3-D runs (exact equivalents only)
SCHEMES_3D = ("zscore", "rgb")


def case_spacing(ds: RawDataset, case: str) -> tuple[float, float, float]:
    """A case's voxel spacing in nnU-Net order [z, y, x] (the NIfTI's zooms reversed)."""
    import nibabel as nib

    path = ds.image_files(case)[0]
    zooms = nib.load(str(path)).header.get_zooms()[:3]
    if len(zooms) != 3:
        raise InputError("not a 3-D volume", "3-D training needs NIfTI volumes (--dims 2 for 2-D data)", path)
    return tuple(abs(float(z)) for z in zooms[::-1])  # type: ignore[return-value]


def training_pipeline(
    ds: RawDataset,
    tasks: Sequence[str],
    spec: ArchSpec,
    patch: Sequence[int],
    spacing: Sequence[float],
    normalization: str = "zscore",
) -> VolumePipeline:
    """The VolumePipeline of a 3-D run (patch and spacing in nnU-Net order [z, y, x])."""
    from weightzoo.zoo.nnunet import nnunet_dataset_json, nnunet_plans

    if normalization not in SCHEMES_3D:
        raise InputError(
            f"normalization {normalization!r} has no exact nnU-Net equivalent for 3-D runs",
            f"use one of {', '.join(SCHEMES_3D)}",
        )
    plans = nnunet_plans(
        spec, CONFIGURATION, ds.name, patch_size=patch, normalization=normalization, spacing=spacing
    )
    djson = nnunet_dataset_json(
        [f"channel{c}" for c in range(ds.n_channels)], {t: ds.task_labels(t) for t in tasks}
    )
    return VolumePipeline.from_plans(plans, CONFIGURATION, djson, mirror_axes=(0, 1, 2))


def median_spacing(ds: RawDataset, cases: Sequence[str]) -> tuple[float, float, float]:
    """nnU-Net's default target spacing for 3d_fullres: the median of the training cases' spacings."""
    return tuple(float(v) for v in np.median([case_spacing(ds, c) for c in cases], axis=0))  # type: ignore[return-value]


def volume_preprocessing(ds: RawDataset, cfg: TrainConfig, train_cases: Sequence[str]) -> Preprocessing:
    """The Preprocessing of a 3-D run (dims 3, with its `training_pipeline`): target spacing =
    cfg.spacing (given in voxel order [i, j, k]) or the median over `train_cases`; the preset planned
    for the patch and that spacing. The pipeline's `spacing` is what the run's ArchSpec is planned for."""
    from weightzoo.train.loop import patch_size

    patch = patch_size(cfg)  # nnU-Net order [z, y, x]
    spacing = tuple(reversed(cfg.spacing)) if cfg.spacing else median_spacing(ds, train_cases)
    spec = ArchSpec.preset(cfg.preset, ds.n_channels, len(cfg.tasks), cfg.dropout, patch, spacing)
    pipe = training_pipeline(ds, cfg.tasks, spec, patch, spacing, cfg.normalization)
    return Preprocessing(cfg.normalization, tuple(cfg.size), cfg.axis, ds.n_channels, 3, pipe.to_dict())


def load_volumes(
    ds: RawDataset, tasks: Sequence[str], cases: Sequence[str], prep: Preprocessing, rater: int = 0
) -> VolumeSet:
    """Cases preprocessed by `prep.pipeline` (nnU-Net's run_case_npy): images [C, z, y, x] float32,
    labels [K, z, y, x] uint8 (voxels outside the non-zero crop, -1 in nnU-Net, are background)."""
    if prep.pipeline is None:
        raise InputError("no 3-D pipeline in the preprocessing", "train with a 3-D preset (--dims 3)")
    pipe = VolumePipeline.from_dict(prep.pipeline)
    task_vals = [ds.task_labels(t) for t in tasks]
    images, labels = [], []
    for case in cases:
        image, label = load_case(ds, case, rater)
        data, spacing = read_nnunet_order(image)
        if data.shape[0] != pipe.channels:
            raise InputError(
                f"case has {data.shape[0]} channels, the model expects {pipe.channels}",
                "use a dataset with the channels the model was trained on",
                ds.image_files(case)[0],
            )
        seg = _label_nnunet_order(image, label)
        x, props = preprocess_case(data, spacing, pipe, seg[None])
        y = binary_task_masks(np.maximum(props["seg"][0], 0), task_vals)  # [K, z, y, x]
        images.append(x.astype(np.float32, copy=False))
        labels.append(y)
    return VolumeSet(
        images,
        labels,
        list(cases),
        [ds.site(c) for c in cases],
        list(tasks),
        tuple(pipe.spacing),  # type: ignore[arg-type]
        prep,
    )


def _label_nnunet_order(image: Image, canonical_label: np.ndarray) -> np.ndarray:
    """A label map read canonical [X, Y, Z] (weightzoo.data.io) -> nnU-Net order [z, y, x] of the
    image's file, as `read_nnunet_order` gives the image."""
    file_order = to_original_orientation(image, canonical_label)  # [i, j, k]
    return np.ascontiguousarray(file_order.transpose(2, 1, 0)).astype(np.int16)
