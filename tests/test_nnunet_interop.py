"""nnU-Net v2 results folders: export -> ingest bit-exact, safe unpickling, clear errors, and (when
nnunetv2 is importable) nnU-Net's own predictor loading our export."""

from __future__ import annotations

import collections
import copy
import importlib.util
import io
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from weightzoo.errors import InputError, ModelError
from weightzoo.nets.unet import ArchSpec, build_network, load_real_state_dict, real_state_dict
from weightzoo.zoo.nnunet import (
    nnunet_dataset_json,
    nnunet_plans,
    output_heads,
    read_nnunet_results,
    spec_from_plans,
    write_nnunet_results,
)

TRAINER_DIR = "Dataset501_Phantom/nnUNetTrainer__nnUNetPlans__2d"


@pytest.fixture(autouse=True)
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _net(spec: ArchSpec, seed: int = 0) -> torch.nn.Module:
    net = build_network(spec, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return net


def _export(tmp_path: Path, spec: ArchSpec, state, tasks=None, **kw) -> Path:
    tasks = tasks or {"cord": [1, 2], "gm": [2]}
    dj = nnunet_dataset_json(["T2"] * spec.input_channels, tasks, ".nii.gz", name="Phantom")
    return write_nnunet_results(tmp_path / TRAINER_DIR, spec, state, dj, **kw)


def test_export_then_ingest_is_bit_exact(tmp_path):
    spec = ArchSpec.preset("tiny", input_channels=1, num_classes=2)
    state = real_state_dict(_net(spec, 1))
    history = {
        "mean_fg_dice": [0.2, 0.5, 0.6],
        "ema_fg_dice": [0.2, 0.23, 0.267],
        "dice_per_class_or_region": [[0.1, 0.3], [0.4, 0.6], [0.5, 0.7]],
        "train_losses": [1.0, 0.8, 0.7],
        "val_losses": [1.1, 0.9, 0.8],
    }
    pth = _export(tmp_path, spec, state, history=history, mirror_axes=(0, 1), info={"run": "r7", "step": 120})
    assert pth == tmp_path / TRAINER_DIR / "fold_0" / "checkpoint_final.pth"
    # plain types only: loads with weights_only=True and no allow-list; full nnU-Net state dict
    assert torch.serialization.get_unsafe_globals_in_checkpoint(pth) == []
    raw = torch.load(pth, map_location="cpu", weights_only=True)
    assert set(raw["network_weights"]) == set(build_network(spec).state_dict())  # aliases included
    assert raw["init_args"]["device"] == torch.device("cpu")
    assert raw["trainer_name"] == "nnUNetTrainer" and raw["current_epoch"] == 3

    (ck,) = read_nnunet_results(tmp_path / "Dataset501_Phantom")  # a dataset folder works too
    assert ck.spec.hash() == spec.hash()
    assert list(ck.state) == list(state)
    assert all(torch.equal(ck.state[k], v) and ck.state[k].dtype == v.dtype for k, v in state.items())
    assert ck.epoch == 3 and ck.fold == "0" and ck.checkpoint == "final" and ck.configuration == "2d"
    assert ck.metrics["mean_fg_dice"] == 0.6 and ck.metrics["ema_fg_dice"] == 0.267
    assert ck.metrics["val_loss"] == 0.8 and ck.metrics["dice_per_class_or_region"] == [0.5, 0.7]
    assert ck.metrics["best_ema"] == 0.267
    assert ck.tasks == ["cord", "gm"] and ck.output_kind == "sigmoid"
    assert ck.mirror_axes == (0, 1) and ck.info["run"] == "r7" and ck.info["arch_hash"] == spec.hash()
    assert ck.plans["configurations"]["2d"]["patch_size"] == [64, 64]


def test_single_label_tasks_become_nnunet_regions(tmp_path):
    spec = ArchSpec.preset("tiny", num_classes=1)
    dj = nnunet_dataset_json(["T2"], {"cord": [1]})
    assert dj["labels"] == {"background": 0, "cord": [1, 1]}  # nnU-Net needs a >1-value list for regions
    assert output_heads(dj) == (["cord"], "sigmoid", {"cord": [1]})
    state = real_state_dict(_net(spec, 2))
    _export(tmp_path, spec, state, tasks={"cord": [1]})
    (ck,) = read_nnunet_results(tmp_path / TRAINER_DIR)
    assert ck.spec.hash() == spec.hash() and ck.task_labels == {"cord": [1]}
    assert all(torch.equal(ck.state[k], v) for k, v in state.items())
    # overlapping regions: each is painted with its most specific label value
    wbc = nnunet_dataset_json(["R", "G", "B"], {"cell": [1, 2], "cytoplasm": [1], "nucleus": [2]}, ".png")
    assert wbc["regions_class_order"] == [1, 1, 2]
    assert nnunet_plans(spec, file_ending=".png")["image_reader_writer"] == "NaturalImage2DIO"


class Payload:
    """A non-tensor object in a pickle: weights_only must refuse it without running its code."""

    ran = False

    def __setstate__(self, state):
        Payload.ran = True


def _nnunet_like_checkpoint(spec: ArchSpec, net: torch.nn.Module, dataset_json: dict, plans: dict) -> dict:
    """What nnU-Net v2's trainer.save_checkpoint writes (values as its code produces them)."""
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.99, nesterov=True)
    net(torch.randn(1, spec.input_channels, 32, 32)).sum().backward()
    opt.step()
    f64 = np.float64
    return {
        "network_weights": collections.OrderedDict(net.state_dict()),
        "optimizer_state": opt.state_dict(),
        "grad_scaler_state": None,
        "logging": {
            "mean_fg_dice": [f64(0.1), f64(0.4), f64(0.7)],
            "ema_fg_dice": [f64(0.1), f64(0.13), f64(0.187)],
            "dice_per_class_or_region": [[f64(0.1)], [f64(0.4)], [f64(0.7)]],
            "train_losses": [f64(0.9), f64(0.5), f64(0.3)],
            "val_losses": [f64(1.0), f64(0.6), f64(0.4)],
            "lrs": [0.01, 0.0099, 0.0098],
            "epoch_start_timestamps": [1.0, 2.0, 3.0],
            "epoch_end_timestamps": [1.5, 2.5, 3.5],
        },
        "_best_ema": f64(0.187),
        "current_epoch": 3,
        "init_args": {
            "plans": plans,
            "configuration": "2d",
            "fold": 2,
            "dataset_json": dataset_json,
            "device": torch.device("cpu"),
        },
        "trainer_name": "nnUNetTrainer_250epochs",
        "inference_allowed_mirroring_axes": (0, 1),
    }


def test_nnunet_checkpoint_with_numpy_and_device_loads_through_the_allow_list(tmp_path):
    dj = {"channel_names": {"0": "T2"}, "labels": {"background": 0, "cord": 1}, "file_ending": ".nii.gz"}
    spec = ArchSpec.preset("tiny", 1, 2)  # softmax labels: background + cord heads
    net = _net(spec, 3)
    plans = nnunet_plans(spec)
    path = tmp_path / "run" / "fold_2" / "checkpoint_best.pth"
    path.parent.mkdir(parents=True)
    torch.save(_nnunet_like_checkpoint(spec, net, dj, plans), path)
    with pytest.raises(pickle.UnpicklingError):  # the numpy scalars need the allow-list
        torch.load(path, weights_only=True)
    (ck,) = read_nnunet_results(tmp_path / "run")  # no plans.json on disk: init_args suffice
    assert ck.spec.hash() == spec.hash() and ck.fold == "2" and ck.checkpoint == "best"
    assert ck.tasks == ["background", "cord"] and ck.output_kind == "softmax"
    assert ck.trainer_name == "nnUNetTrainer_250epochs" and ck.epoch == 3
    assert ck.metrics["mean_fg_dice"] == 0.7 and type(ck.metrics["mean_fg_dice"]) is float
    assert ck.metrics["train_loss"] == 0.3 and ck.metrics["best_ema"] == 0.187
    assert ck.history["lrs"] == [0.01, 0.0099, 0.0098]
    ref = real_state_dict(net)
    assert all(torch.equal(ck.state[k], v) for k, v in ref.items())


def test_disallowed_global_is_refused_without_running_it(tmp_path):
    spec = ArchSpec.preset("tiny", 1, 2)
    dj = {"channel_names": {"0": "T2"}, "labels": {"background": 0, "cord": 1}, "file_ending": ".nii.gz"}
    ckpt = _nnunet_like_checkpoint(spec, _net(spec), dj, nnunet_plans(spec))
    ckpt["logging"]["extra"] = Payload()
    path = tmp_path / "run" / "fold_0" / "checkpoint_final.pth"
    path.parent.mkdir(parents=True)
    torch.save(ckpt, path)
    Payload.ran = False
    with pytest.raises(ModelError) as err:
        read_nnunet_results(tmp_path / "run")
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg
    assert "refused to unpickle test_nnunet_interop.Payload" in msg and "arbitrary code" in msg
    assert not Payload.ran


def test_unsupported_architecture_and_legacy_plans(tmp_path):
    spec = ArchSpec.preset("tiny", 1, 2)
    dj = {"channel_names": {"0": "T2"}, "labels": {"background": 0, "cord": 1}}
    plans = nnunet_plans(spec)
    resenc = copy.deepcopy(plans)
    resenc["configurations"]["2d"]["architecture"]["network_class_name"] = (
        "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"
    )
    with pytest.raises(ModelError, match="ResidualEncoderUNet is not supported"):
        spec_from_plans(resenc, "2d", dj)
    with pytest.raises(InputError, match="no configuration '3d_fullres'"):
        spec_from_plans(plans, "3d_fullres", dj)
    # plans of nnU-Net v2 < 2.3 have no architecture block; converted as nnU-Net converts them
    legacy = copy.deepcopy(plans)
    c = legacy["configurations"]["2d"]
    del c["architecture"]
    c.update(
        UNet_class_name="PlainConvUNet",
        UNet_base_num_features=4,
        unet_max_num_features=16,
        n_conv_per_stage_encoder=[1, 1, 1],
        n_conv_per_stage_decoder=[1, 1],
        pool_op_kernel_sizes=[[1, 1], [2, 2], [2, 2]],
        conv_kernel_sizes=[[3, 3]] * 3,
    )
    assert spec_from_plans(legacy, "2d", dj).hash() == spec.hash()
    legacy["configurations"]["2d"]["UNet_class_name"] = "ResidualEncoderUNet"
    with pytest.raises(ModelError, match="not supported"):
        spec_from_plans(legacy, "2d", dj)
    # a configuration inheriting from another (e.g. 3d_cascade_fullres) resolves through its parent
    legacy_child = copy.deepcopy(plans)
    legacy_child["configurations"]["2d_big"] = {"inherits_from": "2d", "batch_size": 2}
    assert spec_from_plans(legacy_child, "2d_big", dj).hash() == spec.hash()


def test_missing_and_corrupt_inputs_give_one_line_errors(tmp_path):
    with pytest.raises(InputError, match="not found"):
        read_nnunet_results(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=r"no nnU-Net checkpoints \(fold_\*"):
        read_nnunet_results(tmp_path / "empty")
    spec = ArchSpec.preset("tiny", 1, 2)
    pth = _export(tmp_path, spec, real_state_dict(_net(spec)))
    folder = pth.parent.parent
    # truncated file
    data = pth.read_bytes()
    pth.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match="not a readable PyTorch checkpoint"):
        read_nnunet_results(folder)
    # plans neither in init_args nor on disk
    ckpt = torch.load(io.BytesIO(data), weights_only=True)
    ckpt["init_args"] = {}
    torch.save(ckpt, pth)
    (folder / "plans.json").unlink()
    with pytest.raises(InputError, match=r"plans\.json not found"):
        read_nnunet_results(folder)
    # weights of another architecture
    ckpt = torch.load(io.BytesIO(data), weights_only=True)
    ckpt["network_weights"] = build_network(ArchSpec.preset("tiny", 1, 3)).state_dict()
    torch.save(ckpt, pth)
    with pytest.raises(ModelError, match="do not match the model's architecture"):
        read_nnunet_results(folder)
    torch.save({"state_dict": {}}, pth)
    with pytest.raises(ModelError, match="not an nnU-Net v2 checkpoint"):
        read_nnunet_results(folder)


def test_export_checks_its_inputs(tmp_path):
    spec = ArchSpec.preset("tiny", 1, 2)
    state = real_state_dict(_net(spec))
    _export(tmp_path, spec, state)
    with pytest.raises(InputError, match="already exists"):
        _export(tmp_path, spec, state)
    _export(tmp_path, spec, state, overwrite=True)
    with pytest.raises(ModelError, match="2 output head"):
        _export(
            tmp_path / "b",
            ArchSpec.preset("tiny", 1, 3),
            real_state_dict(_net(ArchSpec.preset("tiny", 1, 3))),
        )
    with pytest.raises(ModelError, match="multiple of 4"):
        _export(tmp_path / "c", spec, state, patch_size=[30, 30])
    with pytest.raises(ModelError, match="do not match"):
        _export(tmp_path / "d", spec, real_state_dict(_net(ArchSpec.preset("tiny", 1, 1))))


@pytest.mark.skipif(
    importlib.util.find_spec("nnunetv2") is None,
    reason="nnunetv2 is not installed (optional; see docs/nnunet_interop.md for the manual check)",
)
def test_nnunet_predictor_loads_the_export(tmp_path):
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    spec = ArchSpec.preset("tiny", 1, 2)
    net = _net(spec, 5).eval()
    pth = _export(tmp_path, spec, real_state_dict(net))
    pred = nnUNetPredictor(use_mirroring=False, device=torch.device("cpu"), verbose=False, allow_tqdm=False)
    pred.initialize_from_trained_model_folder(str(pth.parent.parent), use_folds=(0,))
    theirs = pred.network.state_dict()
    assert all(torch.equal(theirs[k], v) for k, v in net.state_dict().items())
    assert pred.label_manager.has_regions and pred.label_manager.num_segmentation_heads == 2
    img = np.random.default_rng(0).normal(100, 20, size=(1, 1, 64, 64)).astype(np.float32)
    _, probs = pred.predict_single_npy_array(img, {"spacing": [999.0, 1.0, 1.0]}, None, None, True)
    x = torch.from_numpy((img[:, 0] - img.mean()) / img.std())[None]
    ours = load_real_state_dict(build_network(spec), real_state_dict(net)).eval()
    with torch.no_grad():
        p = torch.sigmoid(ours(x))[0].numpy()
        assert torch.equal(pred.network.eval()(x), ours(x))
    # nnU-Net accumulates sliding-window logits in float16: agreement to ~1e-3, not bit-exact
    assert np.abs(probs[:, 0] - p).max() < 0.02
