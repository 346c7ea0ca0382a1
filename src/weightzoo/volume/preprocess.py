"""nnU-Net v2 preprocessing of one case, reproduced exactly (nnunetv2 2.8.1, batchgenerators 0.25.5).

Contract
--------
`VolumePipeline`  what a plans configuration + dataset.json say about preprocessing and inference
                  (frozen; `to_dict`/`from_dict` round-trip strictly, for a model folder's JSON).
`read_nnunet_order(image)`   a weightzoo `Image` (NIfTI) -> (data [C, z, y, x] float32, spacing (z, y, x)):
                  the array nnU-Net's default SimpleITKIO gives, i.e. the file's voxel order reversed,
                  read with nibabel (no SimpleITK).
`to_canonical(arr, image)`   the inverse: [..., z, y, x] in nnU-Net order -> [..., X, Y, Z] canonical RAS,
                  the grid `weightzoo.data.io.write_like` expects.
`preprocess_case(data [C, *spatial] float32, spacing, pipeline, seg=None) -> (data, properties)`
                  nnU-Net's `DefaultPreprocessor.run_case_npy`: transpose_forward, crop to the nonzero
                  bounding box, normalise per channel, resample to the target spacing. `properties` holds
                  what the export needs (`spacing`, `shape_before_cropping`, `bbox_used_for_cropping`,
                  `shape_after_cropping_and_before_resampling`) and, when `seg` [1, *spatial] is given,
                  `seg`: the preprocessed segmentation (int8, or int16 when a label exceeds 127; -1 outside
                  the nonzero region), as nnU-Net stores it for training.

Resampling (`resample_data_or_seg_to_shape`) is nnU-Net's: skimage `resize` (mode "edge", no
anti-aliasing) per channel, or per slice plus order-`order_z` interpolation along the low-resolution
axis when the spacing is anisotropic (max/min > 3, "separate z"). skimage's `resize` is scipy's
`ndimage.zoom(grid_mode=True)` clipped to the input range, which is what `_resize` below calls, so
scikit-image is not a dependency. Segmentations use batchgenerators' `resize_segmentation` (per-label
indicator argmax, ties to the nearest-neighbour label). Every name read from a plans file (normalisation
scheme, resampling function) is resolved through an allow-list; nothing is imported by name.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
from scipy import ndimage

from weightzoo.errors import InputError, ModelError

ANISO_THRESHOLD = 3.0  # nnunetv2.configuration.ANISO_THRESHOLD
NORMALIZATIONS = (
    "ZScoreNormalization",
    "CTNormalization",
    "NoNormalization",
    "RescaleTo01Normalization",
    "RGBTo01Normalization",
)
RESAMPLING_FUNCTIONS = ("resample_data_or_seg_to_shape",)  # the allow-list (nnU-Net's default)
RESAMPLING_KWARGS = ("is_seg", "order", "order_z", "force_separate_z", "separate_z_anisotropy_threshold")
# image_reader_writer -> the voxel order it hands nnU-Net: "file" (file order reversed) or "canonical"
READERS = {"SimpleITKIO": "file", "NibabelIO": "file", "NibabelIOWithReorient": "canonical"}
CT_KEYS = ("mean", "std", "percentile_00_5", "percentile_99_5")


def _fix_plans(what: str) -> str:
    return f"{what}; re-plan with nnU-Net's defaults, or run this model with nnU-Net's own predictor"


@dataclass(frozen=True)
class VolumePipeline:
    """Preprocessing and inference settings of one nnU-Net configuration (axes in nnU-Net order,
    i.e. after `transpose_forward`)."""

    configuration: str
    patch_size: tuple[int, ...]  # 3 entries (3-D) or 2 (2-D: slice by slice)
    spacing: tuple[float, ...]  # target spacing, same length as patch_size
    transpose_forward: tuple[int, int, int]
    transpose_backward: tuple[int, int, int]
    normalization: tuple[str, ...]  # one scheme per input channel
    use_mask_for_norm: tuple[bool, ...]
    intensity_properties: tuple[dict[str, float], ...]  # per channel; CTNormalization reads CT_KEYS
    resampling_fn_data: str
    resampling_fn_data_kwargs: dict[str, Any]
    resampling_fn_seg: str
    resampling_fn_seg_kwargs: dict[str, Any]
    resampling_fn_probabilities: str
    resampling_fn_probabilities_kwargs: dict[str, Any]
    output_kind: str  # "sigmoid" (regions, one channel per task) | "softmax" (labels, background first)
    tasks: tuple[str, ...]  # name of each output channel
    task_labels: dict[str, list[int]]  # label values of each output channel
    regions_class_order: tuple[int, ...] | None = None  # sigmoid: value painted per channel
    mirror_axes: tuple[int, ...] | None = None  # axes (of the patch) mirrored for test-time augmentation
    image_reader_writer: str = "SimpleITKIO"

    def __post_init__(self) -> None:
        _check(self)

    # ---- construction ---------------------------------------------------------------------------------
    @classmethod
    def from_plans(
        cls,
        plans: Mapping[str, Any],
        configuration: str,
        dataset_json: Mapping[str, Any],
        mirror_axes: Sequence[int] | None = None,
    ) -> VolumePipeline:
        """From nnU-Net plans, a configuration name and dataset.json. `mirror_axes`: the checkpoint's
        `inference_allowed_mirroring_axes` (plans do not hold them; None = no mirroring)."""
        from weightzoo.zoo.nnunet import _configuration, output_heads

        c = _configuration(plans, configuration, "plans")  # inherits_from resolved as nnU-Net does
        if c.get("previous_stage") or "cascade" in configuration:
            raise ModelError(
                f"configuration {configuration!r} is a cascade stage",
                "run a 3d_fullres, 3d_lowres or 2d configuration (cascades need the previous stage's output)",
            )
        if c.get("preprocessor_name", "DefaultPreprocessor") != "DefaultPreprocessor":
            raise ModelError(
                f"preprocessor {str(c.get('preprocessor_name'))[:60]!r} is not nnU-Net's DefaultPreprocessor",
                _fix_plans("weightzoo reproduces DefaultPreprocessor only"),
            )
        try:
            n_ch = len(dataset_json.get("channel_names") or dataset_json["modality"])
            props = plans.get("foreground_intensity_properties_per_channel") or {}
            tasks, kind, labels = output_heads(dataset_json)
            pipe = cls(
                configuration=str(configuration),
                patch_size=tuple(int(s) for s in c["patch_size"]),
                spacing=tuple(float(s) for s in c["spacing"]),
                transpose_forward=tuple(int(a) for a in plans.get("transpose_forward", (0, 1, 2))),  # type: ignore[arg-type]
                transpose_backward=tuple(int(a) for a in plans.get("transpose_backward", (0, 1, 2))),  # type: ignore[arg-type]
                normalization=tuple(str(s) for s in c["normalization_schemes"]),
                use_mask_for_norm=tuple(bool(b) for b in c["use_mask_for_norm"]),
                intensity_properties=tuple(
                    {k: float(v) for k, v in (props.get(str(i)) or {}).items()} for i in range(n_ch)
                ),
                resampling_fn_data=str(c["resampling_fn_data"]),
                resampling_fn_data_kwargs=dict(c["resampling_fn_data_kwargs"]),
                resampling_fn_seg=str(c["resampling_fn_seg"]),
                resampling_fn_seg_kwargs=dict(c["resampling_fn_seg_kwargs"]),
                resampling_fn_probabilities=str(c["resampling_fn_probabilities"]),
                resampling_fn_probabilities_kwargs=dict(c["resampling_fn_probabilities_kwargs"]),
                output_kind=kind,
                tasks=tuple(tasks),
                task_labels={k: list(v) for k, v in labels.items()},
                regions_class_order=tuple(int(v) for v in dataset_json["regions_class_order"])
                if kind == "sigmoid"
                else None,
                mirror_axes=tuple(int(a) for a in mirror_axes) if mirror_axes is not None else None,
                image_reader_writer=str(plans.get("image_reader_writer", "SimpleITKIO")),
            )
        except KeyError as e:
            raise InputError(
                f"plans configuration {configuration!r} or dataset.json lacks {e}",
                "use the plans.json and dataset.json nnU-Net v2 trained with",
            ) from None
        except (TypeError, ValueError) as e:
            raise InputError(
                f"plans configuration {configuration!r} has a malformed entry ({e})",
                "use the plans.json nnU-Net v2 wrote",
            ) from None
        if len(pipe.normalization) != n_ch:
            raise InputError(
                f"plans have {len(pipe.normalization)} normalization scheme(s), dataset.json {n_ch} channel(s)",
                "use the plans and dataset.json of the same nnU-Net dataset",
            )
        return pipe

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        return copy.deepcopy(d)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: Any = None) -> VolumePipeline:
        """Strict: unknown or missing keys, unknown ops and inconsistent values are one-line errors."""
        if not isinstance(d, Mapping):
            raise InputError("volume pipeline must be a mapping", "re-create it with VolumePipeline", source)
        names = [f.name for f in fields(cls)]
        unknown, missing = sorted(set(d) - set(names)), [k for k in names if k not in d]
        if unknown or missing:
            what = f"unknown key(s) {unknown}" if unknown else f"missing key(s) {missing}"
            raise InputError(f"volume pipeline: {what}", "re-create it with VolumePipeline.to_dict()", source)
        kw = copy.deepcopy(dict(d))
        tuples = ("patch_size", "spacing", "transpose_forward", "transpose_backward", "normalization",
                  "use_mask_for_norm", "intensity_properties", "tasks", "regions_class_order", "mirror_axes")  # fmt: skip
        try:
            for k in tuples:
                if kw.get(k) is not None:
                    kw[k] = tuple(kw[k])
            return cls(**kw)
        except TypeError as e:
            raise InputError(
                f"volume pipeline: {e}", "re-create it with VolumePipeline.to_dict()", source
            ) from None

    @property
    def dim(self) -> int:
        return len(self.patch_size)

    @property
    def channels(self) -> int:
        return len(self.normalization)


def _check(p: VolumePipeline) -> None:
    """One-line errors for anything weightzoo cannot run exactly as nnU-Net."""

    def bad(what: str, fix: str = "re-create it with VolumePipeline.from_plans") -> InputError:
        return InputError(f"volume pipeline: {what}", fix)

    if p.dim not in (2, 3) or len(p.spacing) != p.dim:
        raise bad(
            f"patch_size {list(p.patch_size)} and spacing {list(p.spacing)} must have 2 or 3 equal-length entries"
        )
    if any(not isinstance(s, int) or s < 1 for s in p.patch_size) or any(not s > 0 for s in p.spacing):
        raise bad("patch sizes must be positive integers and spacings positive")
    for t in (p.transpose_forward, p.transpose_backward):
        if sorted(t) != [0, 1, 2]:
            raise bad(f"transpose {list(t)} is not a permutation of [0, 1, 2]")
    if [p.transpose_forward[i] for i in p.transpose_backward] != [0, 1, 2]:
        raise bad("transpose_backward does not invert transpose_forward")
    unknown = [s for s in p.normalization if s not in NORMALIZATIONS]
    if unknown:
        raise ModelError(
            f"normalization scheme {unknown[0][:60]!r} is not supported",
            _fix_plans(f"weightzoo runs {', '.join(NORMALIZATIONS)}"),
        )
    n = p.channels
    if not (len(p.use_mask_for_norm) == len(p.intensity_properties) == n) or n < 1:
        raise bad("normalization, use_mask_for_norm and intensity_properties need one entry per channel")
    for c, (s, props) in enumerate(zip(p.normalization, p.intensity_properties, strict=True)):
        if s == "CTNormalization" and any(k not in props for k in CT_KEYS):
            raise bad(
                f"channel {c} uses CTNormalization but its intensity properties lack {list(CT_KEYS)}",
                "use plans with foreground_intensity_properties_per_channel",
            )
    for name, kwargs in (
        (p.resampling_fn_data, p.resampling_fn_data_kwargs),
        (p.resampling_fn_seg, p.resampling_fn_seg_kwargs),
        (p.resampling_fn_probabilities, p.resampling_fn_probabilities_kwargs),
    ):
        if name not in RESAMPLING_FUNCTIONS:
            raise ModelError(
                f"resampling function {str(name)[:60]!r} is not supported",
                _fix_plans(f"weightzoo runs {', '.join(RESAMPLING_FUNCTIONS)}"),
            )
        if not isinstance(kwargs, dict) or set(kwargs) - set(RESAMPLING_KWARGS):
            raise ModelError(
                f"resampling kwargs {kwargs!r:.80} are not {name}'s",
                _fix_plans(f"allowed: {', '.join(RESAMPLING_KWARGS)}"),
            )
        order, order_z = kwargs.get("order", 3), kwargs.get("order_z", 0)
        if not all(isinstance(o, int) and 0 <= o <= 5 for o in (order, order_z)):
            raise bad(f"resampling orders must be integers 0..5, got {order!r}, {order_z!r}")
        if kwargs.get("force_separate_z") not in (None, True, False):
            raise bad("force_separate_z must be null, true or false")
    if p.output_kind not in ("sigmoid", "softmax"):
        raise bad(f"output_kind must be 'sigmoid' or 'softmax', got {p.output_kind!r}")
    if not p.tasks or set(p.tasks) != set(p.task_labels):
        raise bad("tasks and task_labels must name the same output channels")
    if p.output_kind == "sigmoid" and (
        p.regions_class_order is None or len(p.regions_class_order) != len(p.tasks)
    ):
        raise bad("a sigmoid (region) model needs one regions_class_order value per task")
    if p.mirror_axes is not None and any(not 0 <= a < p.dim for a in p.mirror_axes):
        raise bad(f"mirror_axes {list(p.mirror_axes)} do not fit a {p.dim}-D patch")
    if p.image_reader_writer not in READERS:
        raise ModelError(
            f"image reader {p.image_reader_writer[:60]!r} is not supported for volumes",
            _fix_plans(f"weightzoo reads volumes as {', '.join(READERS)} do"),
        )


# ---- reading a NIfTI the way nnU-Net does, and back ----------------------------------------------------
def read_nnunet_order(image: Any, reader: str = "SimpleITKIO") -> tuple[np.ndarray, tuple[float, ...]]:
    """A weightzoo `Image` (or a list of them, one per channel) -> ([C, z, y, x] float32, spacing (z, y, x)).

    SimpleITKIO/NibabelIO: the file's voxel array with its axes reversed and the header's voxel sizes
    reversed; NibabelIOWithReorient: the same of the closest-canonical (RAS) image."""
    import nibabel as nib

    images = list(image) if isinstance(image, (list, tuple)) else [image]
    arrays, spacings = [], []
    for im in images:
        if getattr(im, "_nifti", None) is None:
            raise InputError(
                "not a NIfTI volume", "3-D nnU-Net models read .nii/.nii.gz", getattr(im, "path", None)
            )
        nif = nib.as_closest_canonical(im._nifti) if READERS[reader] == "canonical" else im._nifti
        arr = np.asarray(nif.get_fdata(dtype=np.float32)).reshape(nif.shape[:3])
        arrays.append(arr.transpose(2, 1, 0))  # [i, j, k] -> [k, j, i]
        spacings.append(tuple(abs(float(z)) for z in nif.header.get_zooms()[:3][::-1]))
    if len({a.shape for a in arrays}) > 1 or len(set(spacings)) > 1:
        raise InputError(
            "the channels differ in shape or spacing",
            "give one file per channel on the same grid",
            images[0].path,
        )
    return np.stack(arrays).astype(np.float32, copy=False), spacings[0]


def to_canonical(arr: np.ndarray, image: Any, reader: str = "SimpleITKIO") -> np.ndarray:
    """[..., z, y, x] in nnU-Net order (as `read_nnunet_order` gave) -> [..., X, Y, Z] canonical RAS."""
    import nibabel as nib
    from nibabel.orientations import apply_orientation, io_orientation, ornt_transform

    a = np.moveaxis(np.asarray(arr), (-3, -2, -1), (2, 1, 0))  # [i, j, k, ...] (file or canonical order)
    if READERS[reader] == "file":
        orig = io_orientation(image._nifti.affine)
        canon = io_orientation(nib.as_closest_canonical(image._nifti).affine)
        a = apply_orientation(a, ornt_transform(orig, canon))
    return np.ascontiguousarray(np.moveaxis(a, (0, 1, 2), (-3, -2, -1)))


# ---- cropping (nnunetv2.preprocessing.cropping) --------------------------------------------------------
def nonzero_bbox(data: np.ndarray) -> tuple[np.ndarray, list[list[int]]]:
    """`create_nonzero_mask` (any channel != 0, holes filled) and acvl_utils' `get_bbox_from_mask`
    (half-open [start, end) per axis; the whole axis where the mask is empty)."""
    mask = ndimage.binary_fill_holes(np.any(data != 0, axis=0))
    bbox = []
    for ax in range(mask.ndim):
        hit = np.flatnonzero(np.any(mask, axis=tuple(a for a in range(mask.ndim) if a != ax)))
        bbox.append([int(hit[0]), int(hit[-1]) + 1] if hit.size else [0, mask.shape[ax]])
    return mask, bbox


def crop_to_nonzero(
    data: np.ndarray, seg: np.ndarray | None = None, nonzero_label: int = -1
) -> tuple[np.ndarray, np.ndarray, list[list[int]]]:
    """nnU-Net's `crop_to_nonzero`: data cropped to the bbox; seg gets `nonzero_label` outside the mask
    (without a seg: a new int8 map, 0 inside, -1 outside)."""
    mask, bbox = nonzero_bbox(data)
    sl = tuple(slice(a, b) for a, b in bbox)
    mask = mask[sl][None]
    data = data[(slice(None), *sl)]
    if seg is not None:
        seg = seg[(slice(None), *sl)]
        seg[(seg == 0) & (~mask)] = nonzero_label
    else:
        seg = np.where(mask, np.int8(0), np.int8(nonzero_label))
    return data, seg, bbox


# ---- normalisation (nnunetv2.preprocessing.normalization.default_normalization_schemes) -----------------
def normalize_channel(
    image: np.ndarray, scheme: str, use_mask: bool, props: Mapping[str, float], seg0: np.ndarray | None
) -> np.ndarray:
    """One channel [*spatial] float32, in place where nnU-Net works in place; the same operations in the
    same dtype, so results are bit-identical."""
    eps = 1e-8  # target dtype float32
    image = image.astype(np.float32, copy=False)
    if scheme == "ZScoreNormalization":
        if use_mask and seg0 is not None:  # mask = the nonzero region (seg >= 0)
            mask = seg0 >= 0
            mean, std = image[mask].mean(), image[mask].std()
            image[mask] = (image[mask] - mean) / (max(std, eps))
        else:
            mean, std = image.mean(), image.std()
            image -= mean
            image /= max(std, eps)
    elif scheme == "CTNormalization":
        np.clip(image, props["percentile_00_5"], props["percentile_99_5"], out=image)
        image -= props["mean"]
        image /= max(props["std"], eps)
    elif scheme == "RescaleTo01Normalization":
        image -= image.min()
        image /= np.clip(image.max(), a_min=eps, a_max=None)
    elif scheme == "RGBTo01Normalization":
        if image.min() < 0 or image.max() > 255:
            raise InputError(
                "RGBTo01Normalization needs values in 0..255",
                "give the 8-bit images the model was trained on",
            )
        image /= 255.0
    elif scheme != "NoNormalization":  # pragma: no cover - VolumePipeline checks the names
        raise ModelError(f"normalization scheme {scheme!r} is not supported")
    return image


# ---- resampling (nnunetv2.preprocessing.resampling.default_resampling) -----------------------------------
def compute_new_shape(
    old_shape: Sequence[int], old_spacing: Sequence[float], new_spacing: Sequence[float]
) -> np.ndarray:
    """nnU-Net's `compute_new_shape`: round(old_spacing / new_spacing * old_shape) per axis."""
    return np.array(
        [int(round(i / j * k)) for i, j, k in zip(old_spacing, new_spacing, old_shape, strict=True)]  # noqa: RUF046
    )


def _lowres_axis(spacing: Sequence[float]) -> np.ndarray:  # nnU-Net's get_lowres_axis
    return np.where(max(spacing) / np.array(spacing) == 1)[0]


def separate_z_axis(
    force_separate_z: bool | None,
    current_spacing: Sequence[float],
    new_spacing: Sequence[float],
    threshold: float = ANISO_THRESHOLD,
) -> int | None:
    """nnU-Net's `determine_do_sep_z_and_axis`: the axis resampled separately (None: resample jointly).

    Anisotropic (max/min spacing > threshold) current, else target spacing -> its coarsest axis, unless
    two or three axes tie for coarsest."""
    if force_separate_z is not None:
        axis = _lowres_axis(current_spacing) if force_separate_z else None
    elif np.max(current_spacing) / np.min(current_spacing) > threshold:
        axis = _lowres_axis(current_spacing)
    elif np.max(new_spacing) / np.min(new_spacing) > threshold:
        axis = _lowres_axis(new_spacing)
    else:
        axis = None
    return int(axis[0]) if axis is not None and len(axis) == 1 else None


def _resize(img: np.ndarray, new_shape: Sequence[int], order: int) -> np.ndarray:
    """skimage.transform.resize(img (float64), new_shape, order, mode="edge", anti_aliasing=False),
    clip=True: scipy's zoom on the pixel grid (grid_mode), clipped to the input's range."""
    factors = np.divide(img.shape, tuple(new_shape))
    out = ndimage.zoom(img, [1 / f for f in factors], order=order, mode="nearest", cval=0, grid_mode=True)
    np.clip(out, np.asarray(np.min(img)), np.asarray(np.max(img)), out=out)
    return out


def _resize_segmentation(seg: np.ndarray, new_shape: Sequence[int], order: int) -> np.ndarray:
    """batchgenerators 0.25.5 `resize_segmentation`: order 0 resizes the label map; otherwise each label's
    indicator is resized and the largest wins, an exact tie going to the nearest-neighbour label when it
    is one of the tied (else the smallest label)."""
    if order == 0:
        return _resize(seg.astype(float), new_shape, 0).astype(seg.dtype)
    labels = np.unique(seg)
    if len(labels) == 1:
        return np.full(tuple(new_shape), labels[0], dtype=seg.dtype)
    scores = np.stack([_resize((seg == c).astype(float), new_shape, order) for c in labels])  # [L, *new]
    best = scores.max(0)
    win = scores.argmax(0)  # first maximum = smallest label
    nn = np.searchsorted(labels, _resize(seg.astype(float), new_shape, 0))  # index of the nearest label
    nn_score = np.take_along_axis(scores, nn[None], 0)[0]
    win = np.where((nn_score == best) & (nn_score > 0), nn, win)
    return labels.astype(seg.dtype)[win]


def resample_data_or_seg(
    data: np.ndarray,
    new_shape: Sequence[int],
    is_seg: bool = False,
    axis: int | None = None,
    order: int = 3,
    order_z: int = 0,
) -> np.ndarray:
    """nnU-Net's `resample_data_or_seg` for [C, *spatial] (3-D spatial): computed in float64, stored in
    the input's dtype. With `axis`, each slice across it is resized in 2-D (order `order`), then that axis
    is interpolated with order `order_z` (nearest for order 0)."""
    shape, new_shape = np.array(data.shape[1:]), np.array(new_shape)
    if not np.any(shape != new_shape):
        return data
    fn = _resize_segmentation if is_seg else _resize
    out = np.zeros((data.shape[0], *new_shape), dtype=data.dtype)
    data = data.astype(float, copy=False)
    for c in range(data.shape[0]):
        if axis is None:
            out[c] = fn(data[c], new_shape, order)
            continue
        inplane = [s for a, s in enumerate(new_shape) if a != axis]
        slices = [fn(np.take(data[c], i, axis), inplane, order) for i in range(shape[axis])]
        here = np.stack(slices, axis=axis)  # [*new_shape] except `axis`, which keeps its old size
        if shape[axis] == new_shape[axis]:
            out[c] = here
            continue
        # align_corners=False coordinates along all axes (identity in-plane), as nnU-Net builds them
        grid = np.mgrid[tuple(slice(0, int(s)) for s in new_shape)].astype(float)
        coords = np.array([(here.shape[a] / float(new_shape[a])) * (grid[a] + 0.5) - 0.5 for a in range(3)])
        if not is_seg or order_z == 0:
            out[c] = ndimage.map_coordinates(here, coords, order=order_z, mode="nearest")
        else:
            for cl in np.unique(here):
                hit = ndimage.map_coordinates(
                    (here == cl).astype(float), coords, order=order_z, mode="nearest"
                )
                out[c][np.round(hit) > 0.5] = cl
    return out


def resample_data_or_seg_to_shape(
    data: np.ndarray,
    new_shape: Sequence[int],
    current_spacing: Sequence[float],
    new_spacing: Sequence[float],
    is_seg: bool = False,
    order: int = 3,
    order_z: int = 0,
    force_separate_z: bool | None = False,
    separate_z_anisotropy_threshold: float = ANISO_THRESHOLD,
) -> np.ndarray:
    """nnU-Net's `resample_data_or_seg_to_shape` (the function plans name); `data` [C, x, y, z]."""
    if data.ndim != 4:
        raise InputError(f"resampling needs [C, x, y, z], got shape {data.shape}")
    axis = separate_z_axis(force_separate_z, current_spacing, new_spacing, separate_z_anisotropy_threshold)
    return resample_data_or_seg(data, new_shape, is_seg, axis, order, order_z)


def resample(data: np.ndarray, new_shape: Sequence[int], current: Sequence[float], new: Sequence[float],
             fn: str, kwargs: Mapping[str, Any]) -> np.ndarray:  # fmt: skip
    """Call a resampling function named in a pipeline (allow-listed) with its plans kwargs."""
    if fn != "resample_data_or_seg_to_shape":  # pragma: no cover - VolumePipeline checks the names
        raise ModelError(f"resampling function {fn!r} is not supported")
    return resample_data_or_seg_to_shape(data, new_shape, current, new, **kwargs)


# ---- one case ---------------------------------------------------------------------------------------------
def preprocess_case(
    data: np.ndarray,
    spacing: Sequence[float],
    pipeline: VolumePipeline,
    seg: np.ndarray | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """nnU-Net's `DefaultPreprocessor.run_case_npy`. data [C, *spatial] (nnU-Net order, e.g. from
    `read_nnunet_order`), spacing of those axes; seg [1, *spatial] integer labels or None.

    Returns (data [C, *new] float32, properties). Order: transpose -> crop -> normalise -> resample."""
    data = np.asarray(data)
    if data.ndim != 4 or data.shape[0] != pipeline.channels:
        raise InputError(
            f"image array of shape {data.shape}",
            f"expected [{pipeline.channels}, z, y, x] (one channel per _000X file, nnU-Net order)",
        )
    data = data.astype(np.float32)  # a copy: the caller's array is left alone
    has_seg = seg is not None
    if seg is not None:
        if seg.shape[1:] != data.shape[1:]:
            raise InputError(f"segmentation shape {seg.shape} differs from the image's {data.shape}")
        seg = np.copy(seg)
    tf = list(pipeline.transpose_forward)
    data = data.transpose([0, *[i + 1 for i in tf]])
    seg = seg.transpose([0, *[i + 1 for i in tf]]) if seg is not None else None
    original_spacing = [float(spacing[i]) for i in tf]
    properties: dict[str, Any] = {
        "spacing": [float(s) for s in spacing],
        "shape_before_cropping": data.shape[1:],
    }

    data, seg, bbox = crop_to_nonzero(data, seg)  # seg: -1 outside the nonzero region
    properties["bbox_used_for_cropping"] = bbox
    properties["shape_after_cropping_and_before_resampling"] = data.shape[1:]

    target = list(pipeline.spacing)
    if len(target) < data.ndim - 1:  # 2-D configuration: the slice axis keeps its spacing
        target = [original_spacing[0], *target]
    new_shape = compute_new_shape(data.shape[1:], original_spacing, target)

    # normalise BEFORE resampling (nnU-Net: resampled nonzero masks would no longer fit the image)
    for c in range(data.shape[0]):
        props = pipeline.intensity_properties[c]
        data[c] = normalize_channel(
            data[c], pipeline.normalization[c], pipeline.use_mask_for_norm[c], props, seg[0]
        )

    data = resample(data, new_shape, original_spacing, target, pipeline.resampling_fn_data,
                    pipeline.resampling_fn_data_kwargs)  # fmt: skip
    if has_seg:  # nnU-Net resamples its nonzero map at inference too, then drops it: skipped here
        seg = resample(seg, new_shape, original_spacing, target, pipeline.resampling_fn_seg,
                       pipeline.resampling_fn_seg_kwargs)  # fmt: skip
        properties["seg"] = seg.astype(np.int16 if np.max(seg) > 127 else np.int8)
    return data, properties
