"""Synthetic spinal-cord phantoms: the embedded default data (no download, deterministic by seed).

Each subject is a small axial volume [X, Y, Z] (X = left-right, Y = posterior-anterior, Z = slices)
in RAS orientation. Anatomy, from outside in: body soft tissue (and air at the edge of a wide field
of view), vertebral body (with intervertebral discs at some levels) and posterior arch (bone), a ring
of epidural fat, the canal filled with CSF, the cord (white matter) with a butterfly of gray matter,
and 0–3 small lesions inside the cord. Cord size, position, eccentricity and rotation differ between
subjects and vary smoothly along Z.

Label map: 0 background, 1 white matter, 2 gray matter, 3 lesion, 4 CSF, 5 bone.
Tasks (label values that make each binary foreground): cord [1,2,3], gm [2], canal [1,2,3,4], lesion [3].

Sites mimic acquisitions: each has its own tissue contrast (T1-like: CSF dark, cord bright; T2-like:
CSF bright, cord dark; T2*-like: GM brighter than WM; PD-like: low CSF/cord contrast), intensity
scale, Rician noise level, smooth bias field, in-plane resolution (blur + down/up sampling) and field
of view (the anatomy is smaller in a wider FOV), so a model trained on one site loses Dice on another.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from scipy import ndimage

from weightzoo.data.raw import RawDataset
from weightzoo.errors import InputError

LABELS = {"background": 0, "wm": 1, "gm": 2, "lesion": 3, "csf": 4, "bone": 5}
TASKS = {"cord": [1, 2, 3], "gm": [2], "canal": [1, 2, 3, 4], "lesion": [3]}
BG, WM, GM, LESION, CSF, BONE = 0, 1, 2, 3, 4, 5
BASE_FOV_MM = 40.0  # in-plane field of view of a site with fov = 1
SLICE_MM = 3.0


@dataclass(frozen=True)
class PhantomSite:
    """Acquisition of one site. Tissue intensities are relative (0..1) before `scale`."""

    name: str
    contrast: str  # T1 | T2 | T2s | PD (for docs and info only)
    tissue: dict[str, float] = field(default_factory=dict)  # air muscle fat bone disc csf wm gm lesion
    scale: float = 1000.0  # scanner units
    noise: float = 0.03  # Rician noise sigma, relative to the tissue range
    bias: float = 0.15  # peak deviation of the multiplicative bias field
    blur: float = 0.6  # in-plane Gaussian PSF sigma, pixels
    downsample: float = 1.0  # acquired at size/downsample pixels, then interpolated back
    fov: float = 1.0  # field of view relative to BASE_FOV_MM (larger: anatomy smaller)


# The four base acquisitions; sites beyond four perturb these (see phantom_sites).
_BASE_SITES = (
    PhantomSite(
        "A",
        "T1",
        dict(air=0.0, muscle=0.35, fat=0.85, bone=0.7, disc=0.4, csf=0.12, wm=0.62, gm=0.55, lesion=0.36),
        scale=1000.0,
        noise=0.03,
        bias=0.10,
        blur=0.5,
        downsample=1.0,
        fov=1.0,
    ),
    PhantomSite(
        "B",
        "T2",
        dict(air=0.0, muscle=0.22, fat=0.55, bone=0.35, disc=0.7, csf=1.0, wm=0.30, gm=0.36, lesion=0.72),
        scale=300.0,
        noise=0.05,
        bias=0.25,
        blur=0.8,
        downsample=1.0,
        fov=1.15,
    ),
    PhantomSite(
        "C",
        "T2s",
        dict(air=0.0, muscle=0.30, fat=0.45, bone=0.15, disc=0.5, csf=0.85, wm=0.32, gm=0.62, lesion=0.78),
        scale=1.0,
        noise=0.07,
        bias=0.15,
        blur=0.5,
        downsample=1.0,
        fov=0.85,
    ),
    PhantomSite(
        "D",
        "PD",
        dict(air=0.0, muscle=0.35, fat=0.70, bone=0.50, disc=0.6, csf=0.58, wm=0.45, gm=0.52, lesion=0.80),
        scale=4000.0,
        noise=0.04,
        bias=0.30,
        blur=0.8,
        downsample=1.6,
        fov=1.25,
    ),
)


def _site_name(i: int) -> str:
    """A, B, ..., Z, AA, AB, ... (spreadsheet-style)."""
    name = ""
    i += 1
    while i:
        i, r = divmod(i - 1, 26)
        name = chr(65 + r) + name
    return name


def phantom_sites(n: int = 4, seed: int = 0) -> list[PhantomSite]:
    """`n` sites: the first four are fixed (T1, T2, T2*, PD-like); more are seeded perturbations."""
    if n < 1:
        raise InputError(f"sites={n}", "ask for at least one site")
    rng = np.random.default_rng([seed, 7919])
    sites = []
    for i in range(n):
        base = _BASE_SITES[i % len(_BASE_SITES)]
        if i < len(_BASE_SITES):
            sites.append(base)
            continue
        tissue = {
            k: (v if k == "air" else float(np.clip(v + rng.uniform(-0.1, 0.1), 0.05, 1.0)))
            for k, v in base.tissue.items()
        }
        sites.append(
            replace(
                base,
                name=_site_name(i),
                tissue=tissue,
                scale=float(base.scale * rng.uniform(0.5, 2.0)),
                noise=float(rng.uniform(0.02, 0.08)),
                bias=float(rng.uniform(0.05, 0.3)),
                blur=float(rng.uniform(0.4, 1.1)),
                downsample=float(rng.choice([1.0, 1.25, 1.6])),
                fov=float(rng.uniform(0.85, 1.25)),
            )
        )
    return sites


def _ellipse_coords(u, v, cx, cy, a, b, theta):
    """Coordinates (p, q) in which the ellipse (centre, semi-axes a, b, rotation theta) is the unit disc."""
    c, s = np.cos(theta), np.sin(theta)
    du, dv = u - cx, v - cy
    return (c * du + s * dv) / a, (-s * du + c * dv) / b


def _smooth(z: np.ndarray, rng: np.random.Generator, amp: float) -> np.ndarray:
    """A smooth random curve along z: linear drift plus one slow sinusoid, amplitude ~amp."""
    n = max(len(z) - 1, 1)
    return amp * (
        rng.uniform(-1, 1) * (z / n - 0.5)
        + rng.uniform(0.3, 1.0) * np.sin(rng.uniform(0.2, 0.6) * z + rng.uniform(0, 2 * np.pi))
    )


def _labels(rng: np.random.Generator, size: int, n_slices: int, fov: float) -> tuple[np.ndarray, np.ndarray]:
    """Label map uint8 [X, Y, Z] and a 'disc' mask (vertebral-body region at disc levels, label 0)."""
    px = 2.0 * fov / size  # one pixel in anatomy units (the image spans [-fov, fov])
    coords = (np.arange(size) - (size - 1) / 2) * px
    u, v = np.meshgrid(coords, coords, indexing="ij")  # u: left-right, v: posterior(-) to anterior(+)
    u, v = u[..., None], v[..., None]
    z = np.arange(n_slices, dtype=np.float64)

    # cord: per-subject size/eccentricity/position, varying smoothly along z
    a0, b0 = rng.uniform(0.19, 0.26), rng.uniform(0.12, 0.16)
    a = a0 * (1 + _smooth(z, rng, 0.08))
    b = b0 * (1 + _smooth(z, rng, 0.06))
    cx = rng.uniform(-0.06, 0.06) + _smooth(z, rng, 0.03)
    cy = rng.uniform(-0.06, 0.04) + _smooth(z, rng, 0.03)
    theta = rng.uniform(-0.2, 0.2) + _smooth(z, rng, 0.05)
    p, q = _ellipse_coords(u, v, cx, cy, a, b, theta)
    cord = p**2 + q**2 <= 1.0

    # canal: the cord lies anteriorly in it; CSF margin of at least 2 pixels all round
    off = rng.uniform(0.0, 0.03)
    ca = a + max(rng.uniform(0.06, 0.11), 2.5 * px)
    cb = b + off + max(rng.uniform(0.06, 0.10), 2.5 * px)
    ccy = cy - off * np.cos(theta)
    ccx = cx + off * np.sin(theta)
    cp, cq = _ellipse_coords(u, v, ccx, ccy, ca, cb, theta)
    r_canal = np.sqrt(cp**2 + cq**2)
    canal = r_canal <= 1.0

    # bone: posterior arch (ring behind the canal, outside a ring of epidural fat) and vertebral body
    fat_w = rng.uniform(1.15, 1.3)
    arch = (r_canal > fat_w) & (r_canal <= fat_w + rng.uniform(0.5, 0.8)) & (cq < 0.3)
    gap = rng.uniform(0.05, 0.09)
    bx, by = rng.uniform(0.32, 0.42), rng.uniform(0.22, 0.3)
    bp, bq = _ellipse_coords(u, v, ccx, ccy + cb + gap + by, bx, by, theta)
    body = bp**2 + bq**2 <= 1.0
    # intervertebral discs at some levels: a smooth periodic pattern along z
    disc_level = np.cos(2 * np.pi * (z + rng.uniform(0, 8)) / rng.uniform(6, 10)) < -0.7
    disc = body & disc_level
    bone = (arch | body) & ~disc

    label = np.zeros((*u.shape[:2], n_slices), np.uint8)
    label[bone] = BONE
    label[canal] = CSF
    label[cord] = WM

    # gray matter: H/butterfly in cord coordinates (q > 0 anterior): 4 horns + commissure, kept
    # one pixel inside the cord so it is always surrounded by white matter
    inner = ndimage.binary_erosion(cord, np.ones((3, 3, 1), bool))
    k = rng.uniform(0.85, 1.15)
    gm = (np.abs(p) < 0.33 * k) & (np.abs(q) < 0.12 * k)  # gray commissure
    for side in (-1.0, 1.0):
        hp, hq = _ellipse_coords(p, q, side * 0.28 * k, -0.38, 0.11 * k, 0.36 * k, -side * 0.5)  # dorsal horn
        vp, vq = _ellipse_coords(p, q, side * 0.33 * k, 0.28, 0.22 * k, 0.28 * k, side * 0.3)  # ventral horn
        gm |= (hp**2 + hq**2 <= 1.0) | (vp**2 + vq**2 <= 1.0)
    label[gm & inner & (p**2 + q**2 <= 0.85**2)] = GM

    # lesions: 0-3 small ellipsoids, fixed in cord coordinates, kept inside the cord
    n_les = rng.choice(4, p=[0.3, 0.35, 0.2, 0.15])
    zz = np.broadcast_to(z, label.shape)
    for _ in range(n_les):
        r0, ang = 0.55 * np.sqrt(rng.uniform()), rng.uniform(0, 2 * np.pi)
        lp, lq = r0 * np.cos(ang), r0 * np.sin(ang)
        c, s = np.cos(theta), np.sin(theta)
        lx = cx + c * lp * a - s * lq * b  # lesion centre per slice, following the cord
        ly = cy + s * lp * a + c * lq * b
        rad = rng.uniform(1.3, 2.5) * px
        z0, rz = rng.uniform(0, n_slices - 1), rng.uniform(0.6, 1.8)
        blob = ((u - lx) ** 2 + (v - ly) ** 2) / rad**2 + ((zz - z0) / rz) ** 2 <= 1.0
        label[blob & inner] = LESION
    return label, disc


def phantom_case(
    rng: np.random.Generator, site: PhantomSite, size: int = 64, n_slices: int = 8
) -> tuple[np.ndarray, np.ndarray]:
    """One subject imaged at `site`: (image float32 [X, Y, Z], label uint8 [X, Y, Z]), X = Y = size."""
    if size < 16 or n_slices < 1:
        raise InputError(f"phantom size {size} x {n_slices} slices", "use size >= 16 and at least one slice")
    label, disc = _labels(rng, size, n_slices, site.fov)
    t = site.tissue
    # per-subject tissue jitter (±5 %) so subjects of one site are not identical in contrast
    val = {k: x * (1 + rng.uniform(-0.05, 0.05)) for k, x in t.items()}
    lut = np.array([val["muscle"], val["wm"], val["gm"], val["lesion"], val["csf"], val["bone"]], np.float32)
    img = lut[label]
    img[disc] = val["disc"]
    # epidural fat: the soft tissue just outside the canal (and not bone)
    near = ndimage.binary_dilation(label == CSF, np.ones((5, 5, 1), bool)) & (label == BG) & ~disc
    img[near] = val["fat"]
    # soft-tissue texture and air outside the body outline (visible at a wide field of view)
    tex = ndimage.gaussian_filter(rng.standard_normal(img.shape).astype(np.float32), (2.5, 2.5, 1.0))
    img += (label == BG) * ~disc * ~near * tex * (0.6 * val["muscle"])
    coords = (np.arange(size) - (size - 1) / 2) * (2.0 * site.fov / size)
    uu, vv = np.meshgrid(coords, coords, indexing="ij")
    body = (uu / rng.uniform(1.0, 1.2)) ** 2 + ((vv - 0.1) / rng.uniform(0.95, 1.1)) ** 2 <= 1.0
    img[~body] = val["air"]

    # acquisition: PSF blur, lower in-plane resolution, bias field, Rician noise, scanner scale
    img = ndimage.gaussian_filter(img, (site.blur, site.blur, 0.0))
    if site.downsample > 1.0:
        small = ndimage.zoom(
            img, (1 / site.downsample, 1 / site.downsample, 1), order=1, grid_mode=True, mode="nearest"
        )
        img = ndimage.zoom(
            small, (size / small.shape[0], size / small.shape[1], 1), order=1, grid_mode=True, mode="nearest"
        )
    c = rng.uniform(-1, 1, 5)
    uz = uu / site.fov
    vz = vv / site.fov
    field_ = c[0] * uz + c[1] * vz + c[2] * uz * vz + c[3] * (uz**2 - 0.33) + c[4] * (vz**2 - 0.33)
    field_ = 1.0 + site.bias * field_ / max(np.abs(field_).max(), 1e-6)
    img *= field_[..., None]
    sigma = site.noise * (max(t.values()) - min(t.values()))
    n1, n2 = rng.normal(0, sigma, (2, *img.shape))
    img = np.sqrt((img + n1) ** 2 + n2**2)
    return (img * site.scale * rng.uniform(0.9, 1.1)).astype(np.float32), label


def rater_annotation(label: np.ndarray, rng: np.random.Generator, jitter_px: float = 1.0) -> np.ndarray:
    """One more plausible annotation of a phantom label map [X, Y, Z], as raters differ:
    - boundary jitter: every boundary moved by a smooth random in-plane displacement (≤ ~jitter_px);
    - ambiguous parts: each lesion (a connected component) left out with probability 0.35 (relabelled
      white matter), as raters disagree on small, faint lesions."""
    shape = label.shape
    field = rng.standard_normal((2, *shape))
    field = np.stack([ndimage.gaussian_filter(f, (4.0, 4.0, 0.0)) for f in field])
    field *= jitter_px / max(float(np.abs(field).max()), 1e-6)
    grid = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij")
    coords = [grid[0] + field[0], grid[1] + field[1], grid[2]]
    out = ndimage.map_coordinates(label, coords, order=0, mode="nearest").astype(np.uint8)
    lesions, n = ndimage.label(out == LESION)
    for i in range(1, n + 1):
        if rng.uniform() < 0.35:
            out[lesions == i] = WM
    return out


def site_affine(site: PhantomSite, size: int) -> np.ndarray:
    """RAS affine: in-plane spacing from the site's field of view, 3 mm slices, centred on 0."""
    sp = BASE_FOV_MM * site.fov / size
    aff = np.diag([sp, sp, SLICE_MM, 1.0])
    aff[:3, 3] = [-(size - 1) / 2 * sp, -(size - 1) / 2 * sp, 0.0]
    return aff


def make_phantom_dataset(
    out_parent: str | Path,
    sites: int = 4,
    subjects_per_site: int = 6,
    size: int = 64,
    n_slices: int = 8,
    seed: int = 0,
    dataset_id: int | None = None,
    name: str = "Phantom",
    raters: int = 0,
) -> RawDataset:
    """Write a phantom nnU-Net raw dataset `out_parent/DatasetXXX_<name>` and return it.

    One case per subject (a [size, size, n_slices] volume, .nii.gz); case ids `ph<site>_<nnn>` and
    subject ids `sub-<site><nnn>` are unique across sites; the `sites` map names each case's site.
    `dataset_id=None` takes the first free id >= 501. Splits are by subject, stratified by site.
    `raters` > 0 adds that many further annotations per case (`rater_annotation`, labelsRaters/), each
    from its own random stream: the images and labelsTr are the same with or without them.
    """
    from weightzoo.data.importers import staged_dataset

    if subjects_per_site < 1:
        raise InputError(f"subjects_per_site={subjects_per_site}", "ask for at least one subject per site")
    site_list = phantom_sites(sites, seed)
    desc = "Synthetic spinal-cord phantoms (weightzoo.data.synth); sites: " + ", ".join(
        f"{s.name}={s.contrast}" for s in site_list
    )
    extra = {
        "phantom": {
            "seed": seed,
            "size": size,
            "n_slices": n_slices,
            "contrasts": {s.name: s.contrast for s in site_list},
        }
    }
    with staged_dataset(
        out_parent, name, dataset_id, {"0": "MRI"}, dict(LABELS), ".nii.gz", dict(TASKS), desc, extra
    ) as w:
        for si, site in enumerate(site_list):
            affine = site_affine(site, size)
            for j in range(subjects_per_site):
                rng = np.random.default_rng([seed, si, j])  # per subject: independent of generation order
                image, label = phantom_case(rng, site, size, n_slices)
                extra_raters = [
                    rater_annotation(label, np.random.default_rng([seed, si, j, 1000 + k]))
                    for k in range(raters)
                ]
                w.add_case(
                    f"ph{site.name}_{j + 1:03d}",
                    [image],
                    label,
                    site=site.name,
                    subject=f"sub-{site.name}{j + 1:03d}",
                    affine=affine,
                    raters=extra_raters,
                )
        return w.publish(split_seed=seed)
