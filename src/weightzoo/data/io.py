"""Read and write images and masks: NIfTI (nibabel) and 2-D PNG/BMP/TIFF (Pillow, tifffile).

Arrays inside weightzoo are channel-first:
  - 2-D images: float32 [C, H, W]; 2-D masks: uint8 [H, W]
  - NIfTI volumes: float32 [C=1, X, Y, Z] in the closest canonical (RAS+) orientation; masks uint8 [X, Y, Z]
`Image` keeps what is needed to write a result back in the input's own orientation, affine and header,
so a mask written by `segment` overlays the input in any viewer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from weightzoo.errors import InputError, require_file

NIFTI_ENDINGS = (".nii.gz", ".nii")
IMAGE2D_ENDINGS = (".png", ".bmp", ".tif", ".tiff", ".jpg", ".jpeg")
AFFINE_TOL = 1e-3  # mm; nibabel rounds affines through float32 headers


def file_ending(path: str | Path) -> str:
    name = Path(path).name.lower()
    for end in NIFTI_ENDINGS + IMAGE2D_ENDINGS:
        if name.endswith(end):
            return end
    return Path(path).suffix.lower()


def is_nifti(path: str | Path) -> bool:
    return file_ending(path) in NIFTI_ENDINGS


@dataclass
class Image:
    """An image as weightzoo processes it, plus what it takes to write results back."""

    array: np.ndarray  # 2-D: [C, H, W]; NIfTI: [1, X, Y, Z] canonical
    path: Path
    affine: np.ndarray | None = None  # canonical affine (NIfTI only)
    spacing: tuple[float, ...] = ()
    _nifti: Any = field(default=None, repr=False)  # original nibabel image (header, affine, orientation)

    @property
    def is_volume(self) -> bool:
        return self._nifti is not None

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape[1:])


def _load_nifti(path: Path) -> Any:
    import nibabel as nib

    try:
        img = nib.load(str(path))
        img.get_fdata(dtype=np.float32)  # force a read: truncated files fail here, not later
    except Exception as e:  # nibabel raises many types for a bad file
        raise InputError(
            f"cannot read NIfTI ({type(e).__name__}: {e})",
            "check that the file is a valid .nii/.nii.gz",
            path,
        ) from None
    return img


def finite_or_error(arr: np.ndarray, path: str | Path) -> np.ndarray:
    """NaN or inf in an image is an error, in every reader: silently replacing them (nan_to_num) would
    hide a broken conversion and change the normalisation of the whole image, and passing them on
    gives an all-zero mask or a NaN model with exit 0."""
    bad = ~np.isfinite(arr)
    if bad.any():
        raise InputError(
            f"image has {int(bad.sum())} NaN/inf voxel(s) (first at index {tuple(int(i) for i in np.argwhere(bad)[0])})",
            "fix or re-export the image (e.g. replace NaN by 0 with fslmaths IMG -nan OUT)",
            path,
        )
    return arr


def read_image(path: str | Path) -> Image:
    """Read a NIfTI volume (reoriented to RAS+) or a 2-D image (gray or RGB); NaN/inf are an error."""
    p = require_file(path, "image")
    if is_nifti(p):
        import nibabel as nib

        img = _load_nifti(p)
        if len(img.shape) > 3 and any(s > 1 for s in img.shape[3:]):
            raise InputError(
                f"4-D NIfTI of shape {img.shape}",
                "split it into one 3-D file per channel (nnU-Net _0000, _0001, ...)",
                p,
            )
        canon = nib.as_closest_canonical(img)
        arr = finite_or_error(np.asarray(canon.get_fdata(dtype=np.float32)).reshape(canon.shape[:3]), p)
        spacing = tuple(float(z) for z in canon.header.get_zooms()[:3])
        return Image(arr[None], p, affine=canon.affine, spacing=spacing, _nifti=img)
    return Image(finite_or_error(_read_2d(p), p), p, spacing=(1.0, 1.0))


def _read_2d(p: Path) -> np.ndarray:
    end = file_ending(p)
    if end not in IMAGE2D_ENDINGS:
        raise InputError(
            f"unsupported file type '{end}'", f"use NIfTI or one of {', '.join(IMAGE2D_ENDINGS)}", p
        )
    try:
        if end in (".tif", ".tiff"):
            import tifffile

            arr = np.asarray(tifffile.imread(str(p)))
        else:
            from PIL import Image as PILImage

            with PILImage.open(p) as im:
                if im.mode.startswith("I;16"):  # 16-bit gray: keep the full range
                    arr = np.asarray(im, dtype=np.uint16 if im.mode != "I;16S" else np.int16)
                else:
                    if im.mode in ("P", "CMYK", "LA", "RGBA", "YCbCr"):
                        im = im.convert("RGB" if im.mode != "LA" else "L")
                    arr = np.asarray(im)
    except Exception as e:
        raise InputError(
            f"cannot read image ({type(e).__name__}: {e})", "check the file is a valid image", p
        ) from None
    if arr.ndim == 2:
        arr = arr[None]
    elif arr.ndim == 3 and arr.shape[-1] in (1, 3, 4):
        arr = np.moveaxis(arr[..., :3] if arr.shape[-1] == 4 else arr, -1, 0)
    else:
        raise InputError(f"unexpected 2-D image shape {arr.shape}", "use a gray or RGB image", p)
    return arr.astype(np.float32)


def read_mask(path: str | Path, like: Image | None = None) -> np.ndarray:
    """Read an integer label map; with `like`, check it matches that image's grid (shape, affine)."""
    p = require_file(path, "mask")
    m = read_image(p)
    arr = m.array[0] if m.is_volume else (m.array[0] if m.array.shape[0] == 1 else m.array.max(0))
    if not np.allclose(arr, np.round(arr)):
        raise InputError("mask has non-integer values", "masks must hold integer labels (0 = background)", p)
    if arr.min() < 0 or arr.max() > 255:
        raise InputError(
            f"mask values outside 0..255 ({arr.min()}..{arr.max()})", "store labels as 0..255", p
        )
    if like is not None:
        check_same_grid(like, m, p)
    return np.round(arr).astype(np.uint8)


def check_same_grid(image: Image, other: Image, other_path: str | Path) -> None:
    """Raise if `other` does not lie on the same voxel grid as `image` (shape, and affine for NIfTI)."""
    if image.spatial_shape != other.spatial_shape:
        raise InputError(
            f"shape {other.spatial_shape} differs from its image {image.path.name} {image.spatial_shape}",
            "resample the mask onto the image grid (e.g. sct_register_multimodal or nnU-Net's resampling)",
            other_path,
        )
    if (
        image.affine is not None
        and other.affine is not None
        and not np.allclose(image.affine, other.affine, atol=AFFINE_TOL)
    ):
        raise InputError(
            f"affine differs from its image {image.path.name}",
            "the mask is in another space: resample it onto the image (same affine and shape)",
            other_path,
        )


def to_original_orientation(ref: Image, canonical: np.ndarray) -> np.ndarray:
    """Map a [X, Y, Z] array in canonical orientation back to `ref`'s on-disk orientation."""
    import nibabel as nib
    from nibabel.orientations import apply_orientation, io_orientation, ornt_transform

    orig = io_orientation(ref._nifti.affine)
    canon = io_orientation(nib.as_closest_canonical(ref._nifti).affine)
    return apply_orientation(canonical, ornt_transform(canon, orig))


def write_like(path: str | Path, array: np.ndarray, ref: Image, dtype: Any = np.uint8) -> Path:
    """Write `array` (canonical [X,Y,Z] for a volume, [H,W] or [C,H,W] for 2-D) on `ref`'s grid.

    NIfTI output has exactly the input's shape, affine, header and orientation; 2-D output is a
    PNG (uint8 masks as-is; float probabilities scaled to 0..255) or a TIFF for float data.
    """
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    arr = np.asarray(array)
    if ref.is_volume:
        import nibabel as nib

        data = to_original_orientation(ref, arr.astype(dtype))
        header = ref._nifti.header.copy()
        header.set_data_dtype(dtype)
        img = nib.Nifti1Image(data, ref._nifti.affine, header)
        img.set_qform(ref._nifti.get_qform(), code=int(ref._nifti.header["qform_code"]))
        img.set_sform(ref._nifti.get_sform(), code=int(ref._nifti.header["sform_code"]))
        if not (out.name.endswith(".nii") or out.name.endswith(".nii.gz")):
            raise InputError(
                "output of a NIfTI input must be .nii or .nii.gz", "name the output e.g. out.nii.gz", out
            )
        nib.save(img, str(out))
        return out
    write_2d(out, arr)
    return out


def write_2d(path: str | Path, arr: np.ndarray) -> Path:
    """Write a 2-D mask/probability map ([H, W]) or image ([C, H, W]) as PNG/BMP or TIFF."""
    out = Path(path)
    end = file_ending(out)
    if arr.ndim == 3:
        arr = arr[0] if arr.shape[0] == 1 else np.moveaxis(arr, 0, -1)
    if end in (".tif", ".tiff"):
        import tifffile

        tifffile.imwrite(str(out), arr)
        return out
    if end not in (".png", ".bmp"):
        raise InputError(f"unsupported output type '{end}'", "write .png, .bmp or .tif", out)
    from PIL import Image as PILImage

    if arr.dtype != np.uint8:
        arr = np.clip(np.round(arr * 255.0 if arr.max() <= 1.0 else arr), 0, 255).astype(np.uint8)
    PILImage.fromarray(arr).save(out)
    return out


def save_nifti(
    path: str | Path, array: np.ndarray, affine: np.ndarray | None = None, dtype: Any = None
) -> Path:
    """Write a plain NIfTI (used by importers and the phantom generator)."""
    import nibabel as nib

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    arr = np.asarray(array) if dtype is None else np.asarray(array, dtype=dtype)
    img = nib.Nifti1Image(arr, np.eye(4) if affine is None else affine)
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    nib.save(img, str(out))
    return out
