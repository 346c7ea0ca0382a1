"""3-D nnU-Net training end to end: presets, patches, augmentation, resumable runs, segment and evaluate.

Tiny nets (tiny3d) on 32 x 32 x 8 phantom volumes; nnU-Net-exact inference itself is covered by
test_volume_inference.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from weightzoo.data.raw import RawDataset
from weightzoo.errors import InputError
from weightzoo.nets.unet import ArchSpec, build_network, plan_3d_stages
from weightzoo.segmenter import load_model
from weightzoo.train.checkpoint import CKPT_JSON
from weightzoo.train.loop import TrainConfig, train_model
from weightzoo.volume.patches import VolumeSet, augment_volumes

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def cli(args: list[object]) -> int:
    from weightzoo.cli import main

    return main([str(a) for a in args])


@pytest.fixture(scope="module")
def volumes(tmp_path_factory: pytest.TempPathFactory) -> RawDataset:
    """2 sites x 5 subjects, 32 x 32 x 8 volumes (3 mm slices, ~1.3 mm in-plane)."""
    from weightzoo.data.synth import make_phantom_dataset

    return make_phantom_dataset(
        tmp_path_factory.mktemp("vol"), sites=2, subjects_per_site=5, size=32, n_slices=8, seed=0
    )


def tiny3d(**kw: object) -> TrainConfig:
    base = dict(tasks=["cord"], preset="tiny3d", size=[32, 32, 8], steps=6, batch_size=2, optimizer="adam")
    return TrainConfig.from_dict({**base, "val_every": 3, "checkpoint_every": 2, "device": "cpu", **kw})


def weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


# ---- presets and config ----------------------------------------------------------------------------
def test_3d_presets_plan_anisotropic_kernels_and_strides_as_nnunet() -> None:
    kernels, strides = plan_3d_stages(4, (16, 64, 64), (3.0, 0.6, 0.6))
    # z (3 mm) is 5x coarser: in-plane only until the in-plane spacing is within 2x of it
    assert kernels[:2] == [[1, 3, 3], [1, 3, 3]] and kernels[2] == [3, 3, 3]
    assert strides == [[1, 1, 1], [1, 2, 2], [1, 2, 2], [2, 2, 2]]
    iso = ArchSpec.preset("small3d", 1, 2, patch=(32, 32, 32))
    assert iso.dims == 3 and iso.size_divisors == (8, 8, 8)
    assert iso.arch_kwargs["conv_op"].endswith("Conv3d") and iso.arch_kwargs["norm_op"].endswith("Norm3d")
    net = build_network(ArchSpec.preset("tiny3d", 2, 3, patch=(8, 32, 32), spacing=(3, 1, 1)), seed=0)
    assert net(torch.zeros(1, 2, 8, 32, 32)).shape == (1, 3, 8, 32, 32)
    assert ArchSpec.preset("small").dims == 2  # 2-D presets are unchanged
    assert ArchSpec.preset("default3d", 1, 1).arch_kwargs["features_per_stage"][-1] == 320


def test_3d_config_checks_patch_and_spacing() -> None:
    cfg = tiny3d(spacing=[1.0, 1.0, 3.0])
    assert cfg.dims == 3 and cfg.to_dict()["spacing"] == [1.0, 1.0, 3.0]
    assert "spacing" not in TrainConfig(tasks=["cord"]).to_dict()  # 2-D configs keep their identity
    with pytest.raises(InputError, match=r"size \[32, 32\] has 2 values; preset 'tiny3d' is 3-D"):
        tiny3d(size=[32, 32])
    with pytest.raises(InputError, match="spacing"):
        tiny3d(spacing=[1.0, -1.0, 3.0])
    with pytest.raises(InputError, match="spacing"):
        TrainConfig.from_dict({"tasks": ["cord"], "spacing": [1, 1, 1]})  # a 2-D run has no spacing


# ---- patches and augmentation --------------------------------------------------------------------------
def _toy_set(shape: tuple[int, int, int] = (6, 20, 24)) -> VolumeSet:
    rng = np.random.default_rng(0)
    img = rng.normal(size=(1, *shape)).astype(np.float32)
    lab = np.zeros((1, *shape), np.uint8)
    lab[0, 2:4, 15:18, 3:6] = 1  # a small off-centre object
    return VolumeSet([img, img[:, :4, 8:18, :12].copy()], [lab, lab[:, :4, 8:18, :12].copy()], ["a", "b"],
                     ["s", "s"], ["obj"], (3.0, 1.0, 1.0), None)  # fmt: skip


def test_patch_sampling_oversamples_foreground_pads_and_is_deterministic() -> None:
    vs = _toy_set()
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    x, y = vs.sample(g(), 8, (4, 16, 16), oversample=0.5)
    assert x.shape == (8, 1, 4, 16, 16) and y.shape == (8, 1, 4, 16, 16) and y.dtype == torch.uint8
    assert all(int(y[b].sum()) > 0 for b in range(4, 8))  # the last half is centred on foreground
    x2, y2 = vs.sample(g(), 8, (4, 16, 16), oversample=0.5)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    px, py = vs.patch(1, [-2, 0, 0], (8, 16, 16))  # case b is 4 x 10 x 12: padded with zeros
    assert (
        px.shape == (1, 8, 16, 16) and not px[:, :2].any() and not px[:, 6:].any() and not px[:, :, 10:].any()
    )
    assert np.array_equal(px[:, 2:6, :10, :12], vs.images[1]) and np.array_equal(
        py[:, 2:6, :10, :12], vs.labels[1]
    )


def test_3d_augmentation_moves_image_and_labels_together() -> None:
    vs = _toy_set()
    x, y = vs.sample(torch.Generator().manual_seed(0), 6, (4, 16, 16), oversample=1.0)
    same_x, same_y = augment_volumes(x, y, 0.0, torch.Generator().manual_seed(1))
    assert torch.equal(same_x, x) and torch.equal(same_y, y)
    ax, ay = augment_volumes(x, y, 1.0, torch.Generator().manual_seed(1))
    bx, by = augment_volumes(x, y, 1.0, torch.Generator().manual_seed(1))
    assert torch.equal(ax, bx) and torch.equal(ay, by) and ay.dtype == torch.uint8
    assert set(ay.unique().tolist()) <= {0, 1} and not torch.equal(ax, x)
    # an image that IS its label (x5): every spatial transform and flip must move both alike
    lab = torch.zeros(4, 1, 6, 16, 16, dtype=torch.uint8)
    lab[:, :, 1:4, 2:9, 3:7] = 1  # asymmetric along every axis: a flip of one alone would show
    for seed in range(10):
        mx, my = augment_volumes(lab.float() * 5, lab, 1.0, torch.Generator().manual_seed(seed))
        for b in range(4):
            inside, outside = mx[b][my[b] == 1], mx[b][my[b] == 0]
            assert inside.numel() and inside.mean() > outside.mean() + 2, (seed, b)


# ---- training, resume, segment, evaluate ------------------------------------------------------------------
def test_3d_run_resumes_bit_exactly(volumes: RawDataset, tmp_path: Path) -> None:
    cfg = tiny3d(steps=6)
    full = train_model(volumes, cfg, tmp_path / "full", progress=False)
    part = train_model(volumes, cfg, tmp_path / "cut", progress=False, stop_after=5)  # "killed" at 5
    assert not part.finished and json.loads((tmp_path / "cut" / CKPT_JSON).read_text())["step"] == 4
    resumed = train_model(volumes, cfg, tmp_path / "cut", progress=False)
    assert resumed.resumed_from == 4
    a, b = weights(tmp_path / "full"), weights(tmp_path / "cut")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    meta = json.loads((tmp_path / "full" / "model.json").read_text())
    assert meta["preprocessing"]["dims"] == 3 and meta["preprocessing"]["pipeline"]["patch_size"] == [
        8,
        32,
        32,
    ]
    assert meta["info"]["n_train_cases"] == len(volumes.cases_in("train"))
    assert type(full.segmenter).__name__ == "VolumeSegmenter"


def _oblique_copy(src: Path, dst: Path) -> Path:
    """The same voxels with a flipped, rotated affine (LPS-like, oblique): the grid must survive."""
    img = nib.load(str(src))
    rot = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, -1.0]])
    aff = img.affine.copy()
    aff[:3, :3] = rot @ aff[:3, :3]
    aff[:3, :3] = aff[:3, :3] @ np.array(
        [[np.cos(0.2), -np.sin(0.2), 0], [np.sin(0.2), np.cos(0.2), 0], [0, 0, 1]]
    )
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), aff), str(dst))
    return dst


def test_3d_model_segments_on_the_inputs_grid_and_evaluates(
    volumes: RawDataset, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = tmp_path / "m"
    assert cli(["train", "-d", volumes.root, "--task", "cord", "--dims", "3", "--preset", "tiny",
                "--patch", "32,32,8", "--steps", "4", "--batch-size", "2", "-o", model, "--no-progress"]) == 0  # fmt: skip
    case = volumes.cases_in("test")[0]
    src = _oblique_copy(volumes.image_files(case)[0], tmp_path / "oblique.nii.gz")
    for flags in ([], ["--mirror"], ["-thr", "0"]):
        out = tmp_path / f"seg{len(flags)}{flags[-1] if flags else ''}.nii.gz"
        assert cli(["segment", "-i", src, "-m", model, "-o", out, *flags]) == 0
        a, b = nib.load(str(src)), nib.load(str(out))
        assert b.shape == a.shape and np.array_equal(b.affine, a.affine)
        assert nib.aff2axcodes(b.affine) == nib.aff2axcodes(a.affine)
    seg = load_model(model, "cpu")
    from weightzoo.data.io import read_image
    from weightzoo.segmenter import segment_image

    probs = segment_image(seg, read_image(src))
    assert probs.shape == (1, *read_image(src).spatial_shape) and 0 <= probs.min() <= probs.max() <= 1
    capsys.readouterr()
    assert cli(["evaluate", "-m", model, "-d", volumes.root, "--split", "test"]) == 0
    summary = json.loads((model / "eval_test" / "summary.json").read_text())
    assert summary["hd95_unit"] == "mm" and summary["grid"].startswith("original")
    assert summary["n_cases"] == len(volumes.cases_in("test"))


def test_3d_errors_name_the_fix(
    volumes: RawDataset, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = [
        "train",
        "-d",
        volumes.root,
        "--task",
        "cord",
        "--steps",
        "2",
        "-o",
        tmp_path / "x",
        "--no-progress",
    ]
    assert cli([*base, "--dims", "3", "--patch", "32,32"]) == 2
    assert "--patch '32,32' is not three comma-separated numbers" in capsys.readouterr().err
    assert cli([*base, "--patch", "32,32,8"]) == 2
    assert "add --dims 3" in capsys.readouterr().err
    model = tmp_path / "m"
    train_model(volumes, tiny3d(steps=2), model, progress=False)
    png = tmp_path / "im.png"
    from PIL import Image as PILImage

    PILImage.fromarray(np.zeros((32, 32), np.uint8)).save(png)
    assert cli(["segment", "-i", png, "-m", model, "-o", tmp_path / "o.png"]) == 2
    assert "a 3-D model segments NIfTI volumes" in capsys.readouterr().err


def test_3d_export_round_trip_is_bit_exact_and_the_zoo_runs_it(volumes: RawDataset, tmp_path: Path) -> None:
    """Our 3-D model -> nnU-Net results folder -> zoo ingest -> `segment -m ZOO:CKPT`: same weights, the
    same pipeline (plans), the same probabilities."""
    from weightzoo.data.io import read_image
    from weightzoo.segmenter import segment_image
    from weightzoo.volume.predictor import volume_segmenter_from_zoo
    from weightzoo.volume.preprocess import VolumePipeline
    from weightzoo.zoo.exchange import export_model_folder, ingest_results
    from weightzoo.zoo.nnunet import read_nnunet_results
    from weightzoo.zoo.store import Zoo

    model = tmp_path / "m"
    train_model(volumes, tiny3d(steps=3), model, progress=False)
    ours = load_model(model, "cpu")
    pth = export_model_folder(model, tmp_path / "results")
    assert pth.parent.parent.name == "nnUNetTrainer__nnUNetPlans__3d_fullres"
    (ck,) = [c for c in read_nnunet_results(pth.parent.parent) if c.checkpoint == "final"]
    assert ck.spec.hash() == ours.spec.hash() and ck.configuration == "3d_fullres"
    assert all(torch.equal(ck.state[k], v) for k, v in weights(model).items())
    back = VolumePipeline.from_plans(ck.plans, ck.configuration, ck.dataset_json, ck.mirror_axes)
    assert back == ours.pipeline
    ingest_results(pth.parent.parent, tmp_path / "zoo")
    with Zoo(tmp_path / "zoo") as z:
        (ckpt,) = [c.ckpt_id for c in z.checkpoints()]
    image = read_image(volumes.image_files(volumes.cases_in("test")[0])[0])
    from_zoo = volume_segmenter_from_zoo(tmp_path / "zoo", ckpt, "cpu")
    assert np.array_equal(segment_image(from_zoo, image), segment_image(ours, image))
    out = tmp_path / "seg.nii.gz"
    assert cli(["segment", "-i", image.path, "-m", f"{tmp_path / 'zoo'}:{ckpt}", "-o", out]) == 0
    assert nib.load(str(out)).shape == nib.load(str(image.path)).shape
    assert cli(["evaluate", "-m", f"{tmp_path / 'zoo'}:{ckpt}", "-d", volumes.root]) == 0
    summary = json.loads((tmp_path / "zoo" / f"eval_{ckpt}_test" / "summary.json").read_text())
    assert summary["n_cases"] == len(volumes.cases_in("test")) and summary["hd95_unit"] == "mm"


def test_tiny_3d_zoo_builds_verifies_and_exports(volumes: RawDataset, tmp_path: Path) -> None:
    from weightzoo.zoo.build import build_zoo
    from weightzoo.zoo.exchange import export_checkpoint
    from weightzoo.zoo.store import Zoo

    grid = {"tasks": [["cord"]], "sites": "all", "seeds": [0, 1], "preset": "tiny3d", "size": [32, 32, 8],
            "steps": 4, "batch_size": 2, "optimizer": "adam", "checkpoints": 1}  # fmt: skip
    res = build_zoo(volumes, grid, tmp_path / "zoo", device="cpu", progress=False, log=lambda s: None)
    assert res.runs_trained == 2 and res.checkpoints_committed == 6 and res.modes == {"sequential": 2}
    with Zoo(tmp_path / "zoo") as z:
        assert z.verify().ok
        (spec,) = [z.spec(h) for h in z.arch_hashes()]
        final = [c for c in z.checkpoints() if c.step == 4]
        assert (
            spec.dims == 3
            and len(final) == 2
            and all(c.metric("val_dice", "cord") is not None for c in final)
        )
        ckpt = final[0].ckpt_id
    again = build_zoo(volumes, grid, tmp_path / "zoo", device="cpu", progress=False, log=lambda s: None)
    assert again.runs_skipped == 2 and again.checkpoints_committed == 0  # resumable: nothing left to do
    pth = export_checkpoint(tmp_path / "zoo", ckpt, tmp_path / "results")
    assert pth.parent.parent.name == "nnUNetTrainer__nnUNetPlans__3d_fullres"


@pytest.mark.realdata
def test_3d_segment_of_sct_t2_keeps_shape_affine_and_orientation(
    volumes: RawDataset, sct_data: Path, tmp_path: Path
) -> None:
    """The issue's goal on the real SCT t2.nii.gz (PSR on disk): the output lies exactly on its grid."""
    t2 = sct_data / "t2" / "t2.nii.gz"
    model = tmp_path / "m"
    train_model(volumes, tiny3d(steps=2), model, progress=False)
    out = tmp_path / "t2_cord.nii.gz"
    assert cli(["segment", "-i", t2, "-m", model, "-o", out, "-thr", "0"]) == 0
    a, b = nib.load(str(t2)), nib.load(str(out))
    assert b.shape == a.shape and np.array_equal(b.affine, a.affine)
    assert nib.aff2axcodes(b.affine) == nib.aff2axcodes(a.affine) == ("P", "S", "R")
    assert np.isfinite(np.asarray(b.dataobj)).all()
