"""Site heads on 3-D networks: train (all phases) on volumes, resume, site-balanced patches, add a site,
segment a NIfTI with --site, evaluate, export to a 3-D model folder and to nnU-Net's 3d_fullres.

Tiny settings: tiny3d on 2 sites x 4 subjects of 32 x 32 x 8 phantom volumes, patch 32,32,8, batch 2,
a few Adam steps.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from weightzoo.data.raw import RawDataset
from weightzoo.errors import InputError, ModelError
from weightzoo.heads import (
    UNIVERSAL,
    HeadedModel,
    HeadedSegmenter,
    HeadedVolumeSegmenter,
    add_site,
    evaluate_headed,
    load_any_model,
    train_heads,
)
from weightzoo.heads.model import BACKBONE_FILE, HEADS_JSON
from weightzoo.heads.phase import VolumePools, site_balanced_patches, site_subset
from weightzoo.heads.segmenter import export_head
from weightzoo.nets.unet import ArchSpec, real_state_dict
from weightzoo.segmenter import load_model, segment_image
from weightzoo.train.config import TrainConfig
from weightzoo.train.loop import patch_size
from weightzoo.volume.patches import VolumeSet
from weightzoo.volume.predictor import VolumeSegmenter
from weightzoo.volume.preprocess import VolumePipeline

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TRAIN_KW = dict(head_stages=1, head_steps=2, unfreeze_steps=2)


def cli(args: list[object]) -> int:
    from weightzoo.cli import main

    return main([str(a) for a in args])


def cfg3d(**kw: object) -> TrainConfig:
    base = dict(tasks=["cord"], preset="tiny3d", size=[32, 32, 8], steps=4, batch_size=2, optimizer="adam")
    return TrainConfig.from_dict({**base, "val_every": 2, "checkpoint_every": 2, "device": "cpu", **kw})


@pytest.fixture(scope="module")
def volumes(tmp_path_factory: pytest.TempPathFactory) -> RawDataset:
    """2 sites x 4 subjects (2 train, 1 val, 1 test each), 32 x 32 x 8 volumes."""
    from weightzoo.data.synth import make_phantom_dataset

    return make_phantom_dataset(
        tmp_path_factory.mktemp("vol"), sites=2, subjects_per_site=4, size=32, n_slices=8
    )


@pytest.fixture(scope="module")
def trained(volumes: RawDataset, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """All phases on both sites: backbone (4 steps), heads A and B (2 each), joint unfreeze (2)."""
    out = tmp_path_factory.mktemp("heads3d") / "cord"
    res = train_heads(volumes, cfg3d(), out, **TRAIN_KW)
    assert res.finished and res.phases_run == ["backbone", "head-A", "head-B", "joint"]
    return out


def weights_of(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    hm = HeadedModel.load(folder)
    return {"backbone": hm.backbone, **hm.heads}


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = weights_of(a), weights_of(b)
    return wa.keys() == wb.keys() and all(
        wa[n].keys() == wb[n].keys() and all(torch.equal(wa[n][k], wb[n][k]) for k in wa[n]) for n in wa
    )


def test_3d_heads_model_is_planned_as_weightzoo_train_plans_it(trained: Path) -> None:
    hm = HeadedModel.load(trained)
    prep = hm.preprocessing
    assert prep.dims == 3 and prep.size == (32, 32, 8) and hm.spec.dims == 3
    pipe = VolumePipeline.from_dict(prep.pipeline)  # type: ignore[arg-type]
    assert tuple(pipe.patch_size) == patch_size(cfg3d()) == (8, 32, 32)
    want = ArchSpec.preset("tiny3d", 1, 1, 0.0, (8, 32, 32), tuple(pipe.spacing))
    assert hm.spec.hash() == want.hash()
    assert hm.sites() == ["A", "B"] and hm.info["phases_done"] == ["backbone", "head-A", "head-B", "joint"]
    info = hm.head_info
    assert info[UNIVERSAL]["n_train_cases"] == 4 and "joint" in info["A"]["route"]
    assert info["A"]["subjects"] == ["sub-A002", "sub-A004"] and info["A"]["n_train_cases"] == 2
    assert set(info["A"]["val_dice"]) == {"cord"}
    assert not (trained / ".runs").exists()


def test_resume_after_kills_gives_identical_weights(
    trained: Path, volumes: RawDataset, tmp_path: Path
) -> None:
    out = tmp_path / "r"
    first = train_heads(volumes, cfg3d(), out, stop_after=3, **TRAIN_KW)  # killed in (a) after step 3
    assert not first.finished and (out / ".runs" / "backbone" / "checkpoint_latest.safetensors").exists()
    # resumes (a) at its step-2 checkpoint, finishes it (2 steps), head A (2), is killed in head B after 1
    second = train_heads(volumes, cfg3d(), out, stop_after=5, **TRAIN_KW)
    assert not second.finished and second.phases_run == ["backbone", "head-A", "head-B"]
    third = train_heads(volumes, cfg3d(), out, stop_after=3, **TRAIN_KW)  # head B again, killed in joint
    assert not third.finished and third.phases_run == ["head-B", "joint"]
    fourth = train_heads(volumes, cfg3d(), out, **TRAIN_KW)
    assert fourth.finished and fourth.phases_run == ["joint"]
    assert same_weights(out, trained)
    assert train_heads(volumes, cfg3d(), out, **TRAIN_KW).phases_run == []  # finished: nothing re-run
    with pytest.raises(ModelError, match="holds a heads model of another run"):
        train_heads(volumes, cfg3d(seed=1), out, **TRAIN_KW)


def test_site_balanced_patches_are_deterministic_and_oversample_foreground() -> None:
    shape = (6, 12, 12)
    labels = [np.zeros((1, *shape), np.uint8) for _ in range(10)]
    for lab in labels:
        lab[0, 3, 6, 6] = 1  # one foreground voxel per case
    images = [np.full((1, *shape), 100.0 if i == 9 else 1.0, np.float32) for i in range(10)]
    sites = ["A"] * 9 + ["B"]  # site B: one case of ten, its voxels 100
    vs = VolumeSet(images, labels, [f"c{i}" for i in range(10)], sites, ["t"], (1.0, 1.0, 1.0), None)
    pools = VolumePools(["A", "B"], [site_subset(vs, "A"), site_subset(vs, "B")], (4, 4, 4))  # type: ignore[list-item]

    def draw(seed: int, oversample: float = 0.33) -> tuple[torch.Tensor, torch.Tensor]:
        return site_balanced_patches(torch.Generator().manual_seed(seed), pools, 4, oversample)

    (x1, y1), (x2, y2) = draw(3), draw(3)
    assert x1.shape == (4, 1, 4, 4, 4) and torch.equal(x1, x2) and torch.equal(y1, y2)
    # nnU-Net: the last round(4 * 0.33) = 1 patch of every batch is centred on foreground
    assert all(int(draw(s)[1][-1].sum()) == 1 for s in range(20))
    # each element's site is uniform: site B's single case gives about half of all patches
    is_b = torch.cat([(draw(s, 0.0)[0] == 100).flatten(1).any(1) for s in range(100)])
    assert 0.4 < float(is_b.float().mean()) < 0.6  # by case it would be 0.1


def test_add_site_on_3d_touches_only_its_head(trained: Path, volumes: RawDataset, tmp_path: Path) -> None:
    out = tmp_path / "m"
    shutil.copytree(trained, out)
    before = {p: (out / p).read_bytes() for p in (BACKBONE_FILE, "heads/A.safetensors")}
    res = add_site(out, volumes, "B", shots=1, steps=2, head_name="B1")
    assert res.finished and res.model is not None and res.model.sites() == ["A", "B", "B1"]
    info = res.model.head_info["B1"]
    assert info["shots"] == 1 and len(info["subjects"]) == 1 and info["n_train_cases"] == 1
    assert all((out / p).read_bytes() == b for p, b in before.items())
    assert not (out / ".runs").exists()


def test_segment_with_site_and_export_to_model_folder_and_nnunet(
    trained: Path, volumes: RawDataset, tmp_path: Path
) -> None:
    case = volumes.cases_in("test", ["B"])[0]
    image_path = volumes.image_files(case)[0]
    seg = load_any_model(trained, site="B", device="cpu")
    assert isinstance(seg, HeadedVolumeSegmenter) and isinstance(seg, VolumeSegmenter) and seg.head == "B"
    with pytest.raises(ModelError, match="3-D heads model segments volumes"):
        HeadedSegmenter(HeadedModel.load(trained), "B")
    # the CLI: -m HEADS --site B -> a label map on the input's grid
    out = tmp_path / "seg.nii.gz"
    assert cli(["segment", "-i", image_path, "-m", trained, "--site", "B", "-o", out]) == 0
    src, got = nib.load(str(image_path)), nib.load(str(out))
    assert got.shape == src.shape and np.allclose(got.affine, src.affine)
    # heads export: a 3-D model folder that predicts exactly as the head, and an nnU-Net 3d_fullres folder
    exp = export_head(trained, "B", tmp_path / "exp")
    plain = load_model(exp, "cpu")
    assert isinstance(plain, VolumeSegmenter) and plain.preprocessing.dims == 3
    from weightzoo.data.io import read_image

    image = read_image(image_path)
    probs = segment_image(seg, image)
    assert probs.shape == (1, *src.shape) and np.array_equal(probs, segment_image(plain, image))
    (pth,) = (exp / "nnUNet_results").glob(
        "*/nnUNetTrainer__nnUNetPlans__3d_fullres/fold_0/checkpoint_final.pth"
    )
    from weightzoo.zoo.nnunet import read_nnunet_results

    (ck,) = [c for c in read_nnunet_results(pth.parent.parent) if c.checkpoint == "final"]
    ref = HeadedModel.load(trained).full_state("B")
    assert ck.configuration == "3d_fullres" and all(torch.equal(ck.state[k], ref[k]) for k in ref)
    # `weightzoo zoo export` of the exported model folder: 3d_fullres, the same weights
    assert cli(["zoo", "export", exp, tmp_path / "results"]) == 0
    (pth2,) = (tmp_path / "results").glob(
        "*/nnUNetTrainer__nnUNetPlans__3d_fullres/fold_0/checkpoint_final.pth"
    )
    (ck2,) = [c for c in read_nnunet_results(pth2.parent.parent) if c.checkpoint == "final"]
    assert ck2.spec.hash() == plain.spec.hash()
    assert all(torch.equal(ck2.state[k], v) for k, v in real_state_dict(plain.net).items())
    assert (
        VolumePipeline.from_plans(ck2.plans, ck2.configuration, ck2.dataset_json, ck2.mirror_axes)
        == plain.pipeline
    )


def test_head_swap_and_evaluate_route_each_site(trained: Path, volumes: RawDataset) -> None:
    hm = HeadedModel.load(trained)
    seg = load_any_model(trained, site="A", device="cpu")
    assert isinstance(seg, HeadedVolumeSegmenter)
    before = {k: v.clone() for k, v in real_state_dict(seg.net).items()}
    seg.use("B")
    after = real_state_dict(seg.net)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and changed <= set(hm.head_tensor_names) and seg.name.endswith("[B]")
    fresh = load_any_model(trained, site="B", device="cpu")
    assert all(torch.equal(after[k], v) for k, v in real_state_dict(fresh.net).items())
    summ = evaluate_headed(trained, volumes, split="test", device="cpu")
    assert summ["heads_used"] == {"A": "A", "B": "B"} and summ["n_cases"] == 2


def test_cli_evaluate_a_3d_heads_model(trained: Path, volumes: RawDataset, tmp_path: Path) -> None:
    out = tmp_path / "summary.json"
    args = ["evaluate", "-m", trained, "-d", volumes.root, "--device", "cpu", "--out", out]
    assert cli(args) == 0
    summ = json.loads(out.read_text())
    assert summ["heads_used"] == {"A": "A", "B": "B"} and summ["n_cases"] == 2


def test_cli_heads_train_dims_3(
    volumes: RawDataset, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "h"
    common = [
        "--dataset",
        volumes.root,
        "--task",
        "cord",
        "--preset",
        "tiny",
        "--dims",
        3,
        "--patch",
        "32,32,8",
    ]
    common += ["--steps", 2, "--head-steps", 1, "--batch-size", 2, "--device", "cpu", "--no-progress"]
    assert cli(["heads", "train", *common, "--site", "A", "--out", out]) == 0
    meta = json.loads((out / HEADS_JSON).read_text())
    assert meta["preprocessing"]["dims"] == 3 and meta["info"]["config"]["preset"] == "tiny3d"
    assert meta["info"]["config"]["size"] == [32, 32, 8]
    assert "universal" in capsys.readouterr().out
    assert cli(["heads", "export", out, "--site", "A", tmp_path / "exp"]) == 0
    assert list((tmp_path / "exp" / "nnUNet_results").glob("*/*3d_fullres/fold_0/checkpoint_final.pth"))
    capsys.readouterr()
    bad = [
        "heads",
        "train",
        "--dataset",
        volumes.root,
        "--task",
        "cord",
        "--patch",
        "32,32,8",
        "--out",
        tmp_path / "x",
    ]
    assert cli(bad) == 2 and "--patch/--spacing are for 3-D training" in capsys.readouterr().err


def test_2d_slices_with_a_3d_config_are_refused(volumes: RawDataset) -> None:
    from weightzoo.data.slices import Preprocessing, load_slices
    from weightzoo.heads.train import train_backbone

    train = load_slices(volumes, ["cord"], "train", prep=Preprocessing(size=(32, 32)))
    with pytest.raises(InputError, match="2-D slices were given with the 3-D preset 'tiny3d'"):
        train_backbone(train, None, cfg3d(), 1)
