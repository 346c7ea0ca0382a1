"""Synthetic spinal-cord phantoms: determinism, anatomy, site differences, dataset layout."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from weightzoo.data.raw import RawDataset
from weightzoo.data.slices import Preprocessing, load_slices, normalize_case
from weightzoo.data.synth import (
    BONE,
    CSF,
    GM,
    LESION,
    TASKS,
    WM,
    make_phantom_dataset,
    phantom_case,
    phantom_sites,
)
from weightzoo.errors import InputError

SITES = {s.name: s for s in phantom_sites(4)}
RING = np.ones((3, 3, 1), bool)  # in-plane 8-neighbourhood


def _cases(site: str, n: int = 12, size: int = 64, n_slices: int = 6) -> list[tuple[np.ndarray, np.ndarray]]:
    return [phantom_case(np.random.default_rng([1, j]), SITES[site], size, n_slices) for j in range(n)]


def test_phantom_case_is_deterministic_by_seed():
    a = phantom_case(np.random.default_rng(3), SITES["B"], 48, 4)
    b = phantom_case(np.random.default_rng(3), SITES["B"], 48, 4)
    c = phantom_case(np.random.default_rng(4), SITES["B"], 48, 4)
    assert a[0].shape == (48, 48, 4) and a[0].dtype == np.float32 and a[1].dtype == np.uint8
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[1], c[1])


def test_dataset_is_deterministic_by_seed(tmp_path):
    kw = dict(sites=2, subjects_per_site=2, size=32, n_slices=2)
    d1 = make_phantom_dataset(tmp_path / "a", seed=5, **kw)
    d2 = make_phantom_dataset(tmp_path / "b", seed=5, **kw)
    d3 = make_phantom_dataset(tmp_path / "c", seed=6, **kw)
    assert d1.cases() == d2.cases() and d1.meta == d2.meta
    for case in d1.cases():
        for f1, f2 in (
            (d1.image_files(case)[0], d2.image_files(case)[0]),
            (d1.label_file(case), d2.label_file(case)),
        ):
            assert np.array_equal(nib.load(f1).get_fdata(), nib.load(f2).get_fdata())
    case = d1.cases()[0]
    assert not np.array_equal(
        nib.load(d1.label_file(case)).get_fdata(), nib.load(d3.label_file(case)).get_fdata()
    )


@pytest.mark.parametrize("site", ["A", "C"])
def test_anatomy_is_nested(site):
    """GM and lesions lie inside the cord (never touching CSF/bone/background); the cord lies in the canal
    with a CSF ring all round; every slice has cord, GM and CSF."""
    n_lesion_subjects = 0
    for _, lab in _cases(site):
        cord = np.isin(lab, TASKS["cord"])
        outside_cord = np.isin(lab, [0, CSF, BONE])
        assert not (ndimage.binary_dilation(lab == GM, RING) & outside_cord).any()
        assert not (ndimage.binary_dilation(lab == LESION, RING) & outside_cord).any()
        assert not (ndimage.binary_dilation(cord, RING) & np.isin(lab, [0, BONE])).any()
        assert (
            (cord.sum((0, 1)) > 0).all()
            and ((lab == GM).sum((0, 1)) > 0).all()
            and ((lab == CSF).sum((0, 1)) > 0).all()
        )
        assert (lab == BONE).any()
        n_les = (lab == LESION).sum()
        assert n_les < 0.15 * cord.sum()  # lesions are small
        n_lesion_subjects += n_les > 0
    assert 0 < n_lesion_subjects < 12  # some subjects have lesions, some none


def test_lesions_are_visible():
    """A lesion differs from the white matter around it by several noise sigmas (T2: bright)."""
    contrasts = []
    for img, lab in _cases("B", n=16):
        les = lab == LESION
        if les.sum() < 4:
            continue
        ring = ndimage.binary_dilation(les, RING, iterations=2) & (lab == WM)
        contrasts.append((img[les].mean() - img[ring].mean()) / img[lab == WM].std())
    assert len(contrasts) >= 3
    assert np.median(contrasts) > 1.0


def test_slices_vary_smoothly_along_z():
    for _, lab in _cases("A", n=6, n_slices=8):
        cord = np.isin(lab, TASKS["cord"])
        area = cord.sum((0, 1)).astype(float)
        assert np.all(np.abs(np.diff(area)) / area[:-1] < 0.3)
        centres = np.array([ndimage.center_of_mass(cord[..., z]) for z in range(cord.shape[2])])
        assert np.abs(np.diff(centres, axis=0)).max() < 3.0  # pixels per slice
        assert not all(np.array_equal(cord[..., 0], cord[..., z]) for z in range(8))  # but not constant


def test_subjects_differ_in_cord_shape():
    areas = [np.isin(lab, TASKS["cord"])[..., 0].sum() for _, lab in _cases("A")]
    assert np.std(areas) / np.mean(areas) > 0.05


def _ratio(cases, labels):
    """Median over subjects of mean intensity in `labels` / mean in the white matter away from CSF."""
    ratios = []
    for img, lab in cases:
        tissue = np.isin(lab, labels) & ~ndimage.binary_dilation(
            np.isin(lab, [WM, GM, LESION]) != np.isin(lab, labels), RING
        )
        wm = (lab == WM) & ~ndimage.binary_dilation(lab == CSF, RING)
        ratios.append(img[tissue if tissue.any() else np.isin(lab, labels)].mean() / img[wm].mean())
    return float(np.median(ratios))


def test_site_contrasts():
    assert _ratio(_cases("A"), [CSF]) < 0.5  # T1-like: CSF dark, cord bright
    assert _ratio(_cases("B"), [CSF]) > 2.0  # T2-like: CSF bright, cord dark
    assert _ratio(_cases("C"), [GM]) > 1.3  # T2*-like: GM brighter than WM
    assert _ratio(_cases("A"), [GM]) < 1.0
    # scanner scale differs too (normalisation is needed)
    means = {s: np.mean([img.mean() for img, _ in _cases(s, n=3)]) for s in "ABCD"}
    assert max(means.values()) / min(means.values()) > 100


def test_sites_differ_in_field_of_view():
    """The same anatomy covers more pixels in a narrow field of view (C) than in a wide one (D)."""
    area = {s: np.median([np.isin(lab, TASKS["cord"]).sum() for _, lab in _cases(s)]) for s in "CD"}
    assert area["C"] > 1.5 * area["D"]


def _dice(pred, ref):
    return 2 * (pred & ref).sum() / max(pred.sum() + ref.sum(), 1)


def test_cord_vs_csf_rule_fitted_on_one_site_fails_on_another():
    """A site shift that matters: inside the canal, the intensity threshold that separates cord from
    CSF on site A (T1) segments the cord well on A and fails on site B (T2, inverted contrast)."""

    def data(site):
        out = []
        for img, lab in _cases(site, n=6):
            x = normalize_case(img[None], "zscore")[0]
            canal = np.isin(lab, TASKS["canal"])
            out.append((x, canal, np.isin(lab, TASKS["cord"])))
        return out

    def score(xs, t, sign):
        return np.mean([_dice((sign * x > sign * t) & canal, y) for x, canal, y in xs])

    a, b = data("A"), data("B")
    grid = [(t, sign) for t in np.linspace(-2, 3, 51) for sign in (1, -1)]
    t_a, s_a = max(grid, key=lambda g: score(a, *g))
    own_b = max(score(b, *g) for g in grid)
    assert score(a, t_a, s_a) > 0.8 and own_b > 0.8
    assert own_b - score(b, t_a, s_a) > 0.3


def test_phantom_sites():
    sites = phantom_sites(6, seed=1)
    assert [s.name for s in sites] == list("ABCDEF")
    assert [s.contrast for s in sites[:4]] == ["T1", "T2", "T2s", "PD"]
    assert sites[4] == phantom_sites(6, seed=1)[4] and sites[4] != phantom_sites(6, seed=2)[4]
    assert len({s.fov for s in sites}) > 3 and len({s.noise for s in sites}) > 3


def test_dataset_layout_and_splits(tiny_phantom_dataset: RawDataset):
    ds = RawDataset.open(tiny_phantom_dataset.root)
    assert ds.root.name.startswith("Dataset") and ds.root.name.endswith("_Phantom")
    assert len(ds.cases()) == 12 and ds.sites() == ["A", "B"]
    assert ds.tasks == TASKS
    meta = json.loads((ds.root / "dataset.json").read_text())
    assert meta["numTraining"] == 12 and meta["file_ending"] == ".nii.gz" and meta["labels"]["gm"] == GM
    subjects = {ds.subject(c) for c in ds.cases()}
    assert len(subjects) == 12  # unique across sites
    splits = ds.splits()
    assert sorted(s for v in splits.values() for s in v) == sorted(
        subjects
    )  # each subject in exactly one split
    for site in ds.sites():
        for split in ("train", "val", "test"):
            assert ds.cases_in(split, [site]), (split, site)
    img = nib.load(ds.image_files("phA_001")[0])
    assert img.shape == (64, 64, 4) and nib.aff2axcodes(img.affine) == ("R", "A", "S")
    zooms_a = nib.load(ds.image_files("phA_001")[0]).header.get_zooms()
    zooms_b = nib.load(ds.image_files("phB_001")[0]).header.get_zooms()
    assert zooms_a[0] != zooms_b[0]  # sites differ in field of view


def test_dataset_loads_as_slices(tiny_phantom_dataset: RawDataset):
    ds = tiny_phantom_dataset
    ss = load_slices(ds, ["cord", "lesion"], split="train", prep=Preprocessing(size=(64, 64)))
    assert ss.images.shape == (8 * 4, 1, 64, 64) and ss.labels.shape == (8 * 4, 2, 64, 64)
    assert ss.labels[:, 0].sum() > 0 and ss.sites() == ["A", "B"]
    assert (ss.labels[:, 1] <= ss.labels[:, 0]).all()  # lesion inside cord


def test_next_free_id_and_bad_arguments(tmp_path):
    d1 = make_phantom_dataset(tmp_path, sites=1, subjects_per_site=1, size=32, n_slices=1)
    d2 = make_phantom_dataset(tmp_path, sites=1, subjects_per_site=1, size=32, n_slices=1)
    assert d1.root.name == "Dataset501_Phantom" and d2.root.name == "Dataset502_Phantom"
    with pytest.raises(InputError, match="already used"):
        make_phantom_dataset(
            tmp_path, sites=1, subjects_per_site=1, size=32, n_slices=1, dataset_id=501, name="Other"
        )
    with pytest.raises(InputError, match="sites=0"):
        make_phantom_dataset(tmp_path, sites=0)
    with pytest.raises(InputError, match="subjects_per_site"):
        make_phantom_dataset(tmp_path, subjects_per_site=0)
    with pytest.raises(InputError, match="size"):
        make_phantom_dataset(tmp_path, size=8)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "Dataset501_Phantom",
        "Dataset502_Phantom",
    ]  # nothing left behind
