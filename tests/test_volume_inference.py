"""weightzoo.volume: nnU-Net's preprocessing, sliding window and export, run on volumes.

Fast tests need no nnunetv2; `test_matches_nnunet_predictor` compares with nnU-Net 2.8.1's own
nnUNetPredictor and is skipped when nnunetv2 is not importable (see docs/nnunet_interop.md).
"""

from __future__ import annotations

import importlib.util
import itertools
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from weightzoo.data.io import read_image, save_nifti, write_like
from weightzoo.errors import InputError, ModelError
from weightzoo.nets.unet import ArchSpec, build_network, real_state_dict
from weightzoo.volume.predictor import (
    predict_volume,
    segment_volume_labels,
    volume_segmenter_from_zoo,
)
from weightzoo.volume.preprocess import (
    VolumePipeline,
    preprocess_case,
    read_nnunet_order,
    resample_data_or_seg_to_shape,
    to_canonical,
)
from weightzoo.volume.sliding_window import (
    compute_gaussian,
    compute_steps_for_sliding_window,
    mirror_and_predict,
    predict_sliding_window,
)
from weightzoo.zoo.nnunet import nnunet_dataset_json, nnunet_plans, write_nnunet_results

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY3D = {
    "n_stages": 3,
    "features_per_stage": [4, 8, 16],
    "conv_op": "torch.nn.modules.conv.Conv3d",
    "kernel_sizes": [[1, 3, 3], [3, 3, 3], [3, 3, 3]],
    "strides": [[1, 1, 1], [1, 2, 2], [2, 2, 2]],  # anisotropic, as nnU-Net plans a [3, .8, .8] mm spacing
    "n_conv_per_stage": [1, 1, 1],
    "n_conv_per_stage_decoder": [1, 1],
    "conv_bias": True,
    "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
    "norm_op_kwargs": {"eps": 1e-05, "affine": True},
    "dropout_op": None,
    "dropout_op_kwargs": None,
    "nonlin": "torch.nn.LeakyReLU",
    "nonlin_kwargs": {"inplace": True},
}
SOFTMAX_DJ = {
    "channel_names": {"0": "T2"},
    "labels": {"background": 0, "cord": 1, "gm": 2},
    "numTraining": 0,
    "file_ending": ".nii.gz",
}


def _model(kind: str = "sigmoid", cfg: str = "3d_fullres"):
    """(spec, net, plans, dataset_json, mirror_axes) of a tiny nnU-Net model with random weights."""
    dj = nnunet_dataset_json(["T2"], {"cord": [1, 2], "gm": [2]}) if kind == "sigmoid" else SOFTMAX_DJ
    heads = 2 if kind == "sigmoid" else 3
    spec = ArchSpec(TINY3D, 1, heads) if cfg != "2d" else ArchSpec.preset("tiny", 1, heads)
    plans = nnunet_plans(spec, cfg, "Dataset777_Vol", patch_size=[8, 32, 32] if cfg != "2d" else [32, 32])
    plans["configurations"][cfg]["spacing"] = [3.0, 0.8, 0.8] if cfg != "2d" else [0.8, 0.8]
    mirror = (0, 1, 2) if cfg != "2d" else (0, 1)
    return spec, build_network(spec, seed=0), plans, dj, mirror


def _synthetic_nifti(path: Path) -> Path:
    """Oblique, flipped, permuted, anisotropic affine; zero border (exercises nnU-Net's crop)."""
    rng = np.random.default_rng(0)
    vol = np.zeros((40, 12, 36), np.float32)
    vol[3:37, 1:11, 2:33] = rng.normal(100, 20, (34, 10, 31))
    vol[10:30, 3:9, 8:28] += 80
    th = 0.3
    rot = np.array([[np.cos(th), 0, np.sin(th)], [0, 1, 0], [-np.sin(th), 0, np.cos(th)]])
    aff = np.eye(4)
    aff[:3, :3] = rot @ np.diag([-0.7, 2.6, -0.9])
    aff[:3, 3] = [12.0, -30.0, 5.0]
    return save_nifti(path, vol.transpose(0, 2, 1), aff[:, [0, 2, 1, 3]])


# ---- fast tests (no nnunetv2) ------------------------------------------------------------------------
def test_steps_and_gaussian_as_nnunet():
    assert compute_steps_for_sliding_window((110, 64, 20), (64, 64, 20), 0.5) == [[0, 23, 46], [0], [0]]
    g = compute_gaussian((8, 32, 32))
    assert g.dtype == torch.float16 and float(g.max()) == 10.0 and float(g.min()) > 0
    assert tuple(int(i) for i in np.unravel_index(int(g.float().argmax()), g.shape)) == (4, 16, 16)


def test_sliding_window_equals_forward_when_window_covers_volume():
    torch.manual_seed(0)
    _, net, *_ = _model()
    net.eval()
    x = torch.randn(1, 8, 32, 32)
    with torch.inference_mode():
        ref = net(x[None])[0]
    # one tile: logits * g / g -> the plain forward (float32 sums: to float32 precision)
    exact = predict_sliding_window(net, x, (8, 32, 32), "cpu", dtype=torch.float32)
    torch.testing.assert_close(exact, ref, rtol=1e-5, atol=1e-6)
    # nnU-Net's float16 sums: the same to float16 precision wherever the Gaussian is not tiny (at the
    # patch corners it falls to ~1e-7 and logits * g keeps few bits -- as in nnU-Net)
    out = predict_sliding_window(net, x, (8, 32, 32), "cpu")
    assert out.dtype == torch.float16 and out.shape == ref.shape
    inner = (compute_gaussian((8, 32, 32)).float() > 0.1).expand_as(ref)
    torch.testing.assert_close(out.float()[inner], ref[inner], rtol=2e-3, atol=2e-3)


def test_sliding_window_tiles_pad_and_average_like_a_forward():
    """A pointwise network gives every tile the full volume's answer: overlapping tiles, the Gaussian
    weights and the zero padding of a too-small axis must average back to the plain forward."""
    torch.manual_seed(0)
    net = torch.nn.Conv3d(1, 2, 1)
    x = torch.randn(1, 21, 45, 27)  # 27 < 32: padded; 21, 45 > patch: overlapping tiles
    with torch.inference_mode():
        ref = net(x[None])[0]
    out = predict_sliding_window(net, x, (8, 32, 32), "cpu", dtype=torch.float32)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_mirror_tta_is_the_mean_of_mirrored_forwards():
    torch.manual_seed(0)
    _, net, *_ = _model()
    net.eval()
    x = torch.randn(1, 1, 8, 32, 32)
    with torch.inference_mode():
        got = mirror_and_predict(net, x, (0, 1, 2))
        flips = [c for i in range(4) for c in itertools.combinations((2, 3, 4), i)]
        want = torch.stack([torch.flip(net(torch.flip(x, f)), f) if f else net(x) for f in flips]).mean(0)
    assert len(flips) == 8
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_resampling_to_the_same_spacing_is_the_identity():
    _, _, plans, dj, _ = _model()
    plans["configurations"]["3d_fullres"]["spacing"] = [2.0, 1.0, 1.5]
    pipe = VolumePipeline.from_plans(plans, "3d_fullres", dj)
    rng = np.random.default_rng(1)
    data = rng.normal(5, 2, (1, 10, 16, 12)).astype(np.float32)  # no zeros: nothing is cropped
    out, props = preprocess_case(data, [2.0, 1.0, 1.5], pipe)
    zscore = (data - data.mean()) / data.std()
    assert out.shape == data.shape and props["bbox_used_for_cropping"] == [[0, 10], [0, 16], [0, 12]]
    np.testing.assert_allclose(out, zscore, rtol=1e-5, atol=1e-5)
    same = resample_data_or_seg_to_shape(data, data.shape[1:], [2, 1, 1.5], [2, 1, 1.5], order=3)
    assert same is data


def test_pipeline_round_trips_and_rejects_unknown_keys_and_ops():
    _, _, plans, dj, mirror = _model("softmax")
    pipe = VolumePipeline.from_plans(plans, "3d_fullres", dj, mirror)
    assert pipe.tasks == ("background", "cord", "gm") and pipe.output_kind == "softmax"
    assert pipe.spacing == (3.0, 0.8, 0.8) and pipe.mirror_axes == (0, 1, 2)
    d = json.loads(json.dumps(pipe.to_dict()))
    assert VolumePipeline.from_dict(d) == pipe
    with pytest.raises(InputError, match="unknown key"):
        VolumePipeline.from_dict({**d, "extra": 1})
    with pytest.raises(InputError, match="missing key"):
        VolumePipeline.from_dict({k: v for k, v in d.items() if k != "spacing"})
    with pytest.raises(ModelError, match=r"resampling function 'os\.system' is not supported"):
        VolumePipeline.from_dict({**d, "resampling_fn_data": "os.system"})
    with pytest.raises(ModelError, match="normalization scheme 'MyNorm' is not supported"):
        VolumePipeline.from_dict({**d, "normalization": ["MyNorm"]})
    bad = json.loads(json.dumps(plans))
    bad["configurations"]["3d_fullres"]["resampling_fn_probabilities_kwargs"]["evil"] = 1
    with pytest.raises(ModelError, match="resampling kwargs"):
        VolumePipeline.from_plans(bad, "3d_fullres", dj)
    with pytest.raises(InputError, match="no configuration '3d_lowres'"):
        VolumePipeline.from_plans(plans, "3d_lowres", dj)


def test_nnunet_order_round_trips_to_canonical(tmp_path):
    img = read_image(_synthetic_nifti(tmp_path / "s.nii.gz"))
    data, spacing = read_nnunet_order(img)
    raw = np.asarray(nib.load(img.path).dataobj, dtype=np.float32)
    assert np.array_equal(data[0], raw.transpose(2, 1, 0)) and spacing == pytest.approx((2.6, 0.9, 0.7))
    assert np.array_equal(to_canonical(data, img), img.array)


def test_output_has_the_input_grid_and_zoo_path_agrees(tmp_path):
    img = read_image(_synthetic_nifti(tmp_path / "case_0000.nii.gz"))
    spec, net, plans, dj, mirror = _model()
    pipe = VolumePipeline.from_plans(plans, "3d_fullres", dj, mirror)
    probs = predict_volume(net, pipe, img, "cpu", mirror=False)
    labels = segment_volume_labels(net, pipe, img, "cpu", mirror=False)
    assert probs.shape == (2, *img.array.shape[1:]) and probs.dtype == np.float32
    assert labels.shape == img.array.shape[1:] and probs.min() >= 0 and probs.max() <= 1
    out = write_like(tmp_path / "pred.nii.gz", labels, img)
    back, src = nib.load(out), nib.load(img.path)
    assert back.shape == src.shape and np.allclose(back.affine, src.affine)

    from weightzoo.zoo.exchange import ingest_results
    from weightzoo.zoo.store import Zoo

    folder = tmp_path / "res/Dataset777_Vol/nnUNetTrainer__nnUNetPlans__3d_fullres"
    write_nnunet_results(folder, spec, real_state_dict(net), dj, plans=plans, configuration="3d_fullres",
                         mirror_axes=mirror)  # fmt: skip
    ingest_results(folder, tmp_path / "zoo")
    with Zoo(tmp_path / "zoo") as z:
        ckpt = z.checkpoints()[0].ckpt_id
    seg = volume_segmenter_from_zoo(tmp_path / "zoo", ckpt, "cpu")
    assert seg.tasks == ["cord", "gm"] and seg.pipeline == pipe
    assert np.array_equal(seg.segment_volume(img), probs)


def test_2d_configuration_runs_slice_by_slice(tmp_path):
    img = read_image(_synthetic_nifti(tmp_path / "case_0000.nii.gz"))
    _, net, plans, dj, mirror = _model("softmax", "2d")
    pipe = VolumePipeline.from_plans(plans, "2d", dj, mirror)
    probs = predict_volume(net, pipe, img, "cpu", mirror=True)
    assert probs.shape == (3, *img.array.shape[1:])
    np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-5)  # softmax: background first, sums to 1


# ---- exactness against nnU-Net itself ------------------------------------------------------------------
NEEDS_NNUNET = pytest.mark.skipif(
    importlib.util.find_spec("nnunetv2") is None,
    reason="nnunetv2 is not installed (optional; install it into a scratch target, see docs/nnunet_interop.md)",
)


def _compare_with_nnunet(tmp_path: Path, kind: str, cfg: str, path: Path) -> None:
    """nnUNetPredictor (SimpleITK reading, its preprocessing, sliding window, export) vs ours, without
    and with mirroring: identical label maps (also after write_like, read back with SimpleITK) and
    identical probabilities."""
    import SimpleITK as sitk
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    spec, net, plans, dj, mirror = _model(kind, cfg)
    folder = tmp_path / f"res/Dataset777_Vol/nnUNetTrainer__nnUNetPlans__{cfg}"
    write_nnunet_results(
        folder, spec, real_state_dict(net), dj, plans=plans, configuration=cfg, mirror_axes=mirror
    )
    pipe = VolumePipeline.from_plans(plans, cfg, dj, mirror)
    img = read_image(path)
    data, props = SimpleITKIO().read_images([str(path)])
    ours, spacing = read_nnunet_order(img)
    assert np.array_equal(data, ours) and np.allclose(props["spacing"], spacing)
    for use_mirroring in (False, True):
        pred = nnUNetPredictor(
            tile_step_size=0.5,
            use_gaussian=True,
            use_mirroring=use_mirroring,
            perform_everything_on_device=False,
            device=torch.device("cpu"),
            verbose=False,
            allow_tqdm=False,
        )
        pred.initialize_from_trained_model_folder(str(folder), (0,), "checkpoint_final.pth")
        seg_n, probs_n = pred.predict_single_npy_array(data, props, None, None, True)
        labels_n = pred.predict_single_npy_array(data, props, None, None, False)
        probs = predict_volume(net, pipe, img, "cpu", use_mirroring)
        labels = segment_volume_labels(net, pipe, img, "cpu", use_mirroring)
        written = write_like(tmp_path / "pred.nii.gz", labels, img)
        assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(written))), labels_n)
        assert np.array_equal(to_canonical(seg_n, img), labels)
        assert float(np.abs(to_canonical(probs_n, img) - probs).max()) == 0.0


@NEEDS_NNUNET
@pytest.mark.parametrize(("kind", "cfg"), [("sigmoid", "3d_fullres"), ("softmax", "2d")])
def test_matches_nnunet_predictor(tmp_path, kind, cfg):
    _compare_with_nnunet(tmp_path, kind, cfg, _synthetic_nifti(tmp_path / "case_0000.nii.gz"))


@NEEDS_NNUNET
@pytest.mark.realdata
def test_matches_nnunet_predictor_on_anisotropic_t2s(tmp_path, sct_data):
    """Real 0.5 x 0.5 x 7.5 mm T2* (LAS): nnU-Net resamples it with separate z."""
    _compare_with_nnunet(tmp_path, "softmax", "3d_fullres", sct_data / "t2s" / "t2s.nii.gz")
