"""A site seen from a few unlabelled images: pooled features of the BASE network's encoder.

An acquisition site (contrast, noise, resolution, field of view) shows in the statistics of what a
network's encoder computes on its images. The delta generator is conditioned on

    per image i:  f_i = concat over encoder stages s of [mean_hw(z_s), std_hw(z_s)]   # [E]
    site:         e   = mean_i f_i                                                   # [E]

with z_s [C_s, h, w] the output of encoder stage s of the base (the same frozen network for every
site, so embeddings are comparable; E = 2·Σ_s C_s, 56 for the tiny preset, 480 for small). No label
and no site id is needed, so a site the zoo never saw is described the same way as a known one. The
mean is taken over the images sorted per feature, so the embedding does not depend on the order of
the images, bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from weightzoo.data.raw import RawDataset
from weightzoo.data.slices import Preprocessing, case_slices, load_slices, normalize_case, resize
from weightzoo.errors import InputError

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".png", ".bmp", ".jpg", ".jpeg", ".tif", ".tiff")
MAX_SLICES = 64  # slices of a --site-images folder used at most (evenly spaced)


@torch.no_grad()
def image_features(net: torch.nn.Module, images: np.ndarray | torch.Tensor, batch: int = 64) -> torch.Tensor:
    """Per-image pooled encoder features of `net` (a PlainConvUNet): images [N, C, H, W] -> [N, E]."""
    net.eval()
    x_all = torch.as_tensor(np.asarray(images, dtype=np.float32))
    out = []
    for i in range(0, len(x_all), batch):
        skips = net.encoder(x_all[i : i + batch])  # list of [B, C_s, h_s, w_s]
        feats = [torch.cat([z.mean(dim=(2, 3)), z.std(dim=(2, 3), unbiased=False)], 1) for z in skips]
        out.append(torch.cat(feats, 1))
    return torch.cat(out).float()


def site_embedding(features: torch.Tensor) -> torch.Tensor:
    """[n, E] per-image features -> [E]: the mean over images, independent of their order."""
    if features.ndim != 2 or len(features) == 0:
        raise InputError("no images to describe the site", "give at least one unlabelled image")
    return torch.sort(features.double(), dim=0).values.sum(0).div(len(features)).float()


def dataset_site_images(
    ds: RawDataset, site: str, prep: Preprocessing, n: int = 8, split: str = "train", seed: int = 0
) -> np.ndarray:
    """`n` slices (images [n, C, H, W]) of one site's `split` subjects, drawn with `seed`; labels unused."""
    cases = ds.cases_in(split, [ds.check_site(site)])
    if not cases:
        raise InputError(f"site {site} has no {split} cases", "choose another site or split", ds.root)
    tasks = list(ds.tasks)[:1]
    s = load_slices(ds, tasks, prep=prep, cases=cases)
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(len(s), size=min(n, len(s)), replace=False))
    return np.ascontiguousarray(s.images[idx])


def folder_images(folder: str | Path, prep: Preprocessing) -> np.ndarray:
    """Every image in `folder` (NIfTI or 2-D), preprocessed as the base's training data: [n, C, H, W].
    Volumes count every slice; more than MAX_SLICES slices are thinned evenly."""
    from weightzoo.data.io import read_image

    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(
            "the site-images folder does not exist", "give a folder of unlabelled images", folder
        )
    files = sorted(p for p in folder.iterdir() if p.name.lower().endswith(IMAGE_SUFFIXES))
    if not files:
        raise InputError(
            "no images in the site-images folder", f"put images ({', '.join(IMAGE_SUFFIXES)}) there", folder
        )
    slices = []
    for f in files:
        img = read_image(f)
        if img.array.shape[0] != prep.channels:
            raise InputError(
                f"image has {img.array.shape[0]} channel(s), the base expects {prep.channels}",
                "give images of the modality the base was trained on",
                f,
            )
        x = case_slices(normalize_case(img.array, prep.normalization), prep.axis, img.is_volume)
        slices.append(resize(x, prep.size).numpy())
    out = np.concatenate(slices)
    if len(out) > MAX_SLICES:
        out = out[np.linspace(0, len(out) - 1, MAX_SLICES).round().astype(int)]
    return np.ascontiguousarray(out, dtype=np.float32)


def embed_sites(
    net: torch.nn.Module, ds: RawDataset, sites: Sequence[str], prep: Preprocessing, split: str = "train"
) -> dict[str, torch.Tensor]:
    """Per-image features of every `split` slice of each site: {site: [n_site, E]} (the generator's
    training draws random subsets of these to make site embeddings)."""
    out = {}
    for site in sites:
        cases = ds.cases_in(split, [ds.check_site(site)])
        if not cases:
            continue
        s = load_slices(ds, list(ds.tasks)[:1], prep=prep, cases=cases)
        out[site] = image_features(net, s.images)
    return out
