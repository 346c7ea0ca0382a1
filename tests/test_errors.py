"""Every bad input gets exit code 2 and ONE line that names the file, never a traceback."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from weightzoo.data.io import save_nifti
from weightzoo.data.raw import RawDataset, RawDatasetWriter
from weightzoo.data.slices import Preprocessing
from weightzoo.nets.unet import ArchSpec, build_network
from weightzoo.segmenter import MODEL_JSON, MODEL_WEIGHTS, save_model

SHAPE = (16, 16, 4)


def cli(args: list[str]) -> int:
    from weightzoo.cli import main

    return main([str(a) for a in args])


def assert_error(code: int, capsys: pytest.CaptureFixture[str], names: str | Path, *words: str) -> str:
    """Exit 2, a single 'error:' line on stderr naming `names` (and `words`), and no traceback."""
    out = capsys.readouterr()
    text = out.err.strip()
    assert code == 2, (code, out.err, out.out)
    assert "Traceback" not in out.err + out.out
    assert text.startswith("error:") and len(text.splitlines()) == 1, text
    assert str(names) in text, (str(names), text)
    for w in words:
        assert w in text, (w, text)
    return text


def make_model(
    folder: Path, preset: str = "tiny", channels: int = 1, tasks: tuple[str, ...] = ("cord",)
) -> Path:
    spec = ArchSpec.preset(preset, input_channels=channels, num_classes=len(tasks))
    norm = "rgb" if channels == 3 else "zscore"
    prep = Preprocessing(normalization=norm, size=(16, 16), channels=channels)
    return save_model(folder, build_network(spec, seed=0), spec, list(tasks), prep, 0.0)


@pytest.fixture
def model(tmp_path: Path) -> Path:
    return make_model(tmp_path / "model")


@pytest.fixture
def volume(tmp_path: Path) -> Path:
    return save_nifti(tmp_path / "img.nii.gz", np.random.default_rng(0).normal(size=SHAPE).astype(np.float32))


def make_dataset(
    parent: Path, label_shape: tuple[int, ...] = SHAPE, label_affine: np.ndarray | None = None
) -> RawDataset:
    """6 cases, sites A/B; case c0's label file is rewritten with `label_shape` / `label_affine`."""
    w = RawDatasetWriter(parent, 501, "Bad", {"0": "T2"}, {"background": 0, "cord": 1}, ".nii.gz")
    for i in range(6):
        lab = np.zeros(SHAPE, np.uint8)
        lab[4:9, 4:9, 1:3] = 1
        w.add_case(f"c{i}", [lab * 100.0 + i], lab, site="AB"[i % 2], subject=f"s{i}")
    ds = w.finish()
    if label_shape != SHAPE or label_affine is not None:
        save_nifti(ds.label_file("c0"), np.zeros(label_shape, np.uint8), label_affine)
    return ds


def evaluate_all(model: Path, ds: RawDataset, *extra: str) -> int:
    return cli(
        ["evaluate", "-m", model, "-d", ds.root, "--split", "all", "-o", model.parent / "s.json", *extra]
    )


# ---- images -------------------------------------------------------------------------------------


def test_missing_image_file(tmp_path: Path, model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope.nii.gz"
    assert_error(
        cli(["segment", "-i", missing, "-m", model, "-o", tmp_path / "o.nii.gz"]),
        capsys,
        missing,
        "not found",
    )


def test_file_names_with_brackets_are_printed_verbatim(
    tmp_path: Path, model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "[/run]" / "[bold]x.nii.gz"  # rich would read these as markup
    assert_error(
        cli(["segment", "-i", missing, "-m", model, "-o", tmp_path / "o.nii.gz"]),
        capsys,
        missing,
        "not found",
    )


def test_unreadable_image_garbage_bytes(
    tmp_path: Path, model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "garbage.nii.gz"
    bad.write_bytes(b"this is not a NIfTI file at all" * 10)
    assert_error(
        cli(["segment", "-i", bad, "-m", model, "-o", tmp_path / "o.nii.gz"]), capsys, bad, "cannot read"
    )


def test_image_with_wrong_number_of_channels(
    tmp_path: Path, volume: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rgb_model = make_model(tmp_path / "rgb_model", channels=3)
    code = cli(["segment", "-i", volume, "-m", rgb_model, "-o", tmp_path / "o.nii.gz"])
    assert_error(code, capsys, volume, "1 channel", "expects 3")


def test_output_type_that_does_not_fit_the_input(
    tmp_path: Path, model: Path, volume: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "o.png"
    assert_error(cli(["segment", "-i", volume, "-m", model, "-o", out]), capsys, out, ".nii.gz")


@pytest.mark.parametrize("thr", ["1.5", "-0.2"])
def test_threshold_out_of_range(
    tmp_path: Path, model: Path, volume: Path, thr: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli(["segment", "-i", volume, "-m", model, "-o", tmp_path / "o.nii.gz", "-thr", thr])
    assert_error(
        code, capsys, f"threshold {thr} is outside (0, 1)"
    )  # an option, not a file: it names the value


def test_largest_with_probabilities(
    tmp_path: Path, model: Path, volume: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli(["segment", "-i", volume, "-m", model, "-o", tmp_path / "o.nii.gz", "-thr", "0", "--largest"])
    assert_error(code, capsys, volume, "--largest")


# ---- models -------------------------------------------------------------------------------------


def test_missing_model_folder(tmp_path: Path, volume: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "no_model"
    assert_error(
        cli(["segment", "-i", volume, "-m", missing, "-o", tmp_path / "o.nii.gz"]),
        capsys,
        missing,
        "not found",
    )


def test_model_folder_with_missing_weights(
    tmp_path: Path, model: Path, volume: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (model / MODEL_WEIGHTS).unlink()
    code = cli(["segment", "-i", volume, "-m", model, "-o", tmp_path / "o.nii.gz"])
    assert_error(code, capsys, model / MODEL_WEIGHTS, "missing")


def test_model_folder_with_corrupt_weights(
    tmp_path: Path, model: Path, volume: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (model / MODEL_WEIGHTS).write_bytes(b"\x00\x01garbage" * 100)
    code = cli(["segment", "-i", volume, "-m", model, "-o", tmp_path / "o.nii.gz"])
    assert_error(code, capsys, model / MODEL_WEIGHTS, "cannot read weights")


def test_model_json_that_is_not_json(
    tmp_path: Path, model: Path, volume: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (model / MODEL_JSON).write_text("{not json")
    code = cli(["segment", "-i", volume, "-m", model, "-o", tmp_path / "o.nii.gz"])
    assert_error(code, capsys, model / MODEL_JSON, "not valid JSON")


def test_weights_of_another_architecture(
    tmp_path: Path, volume: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = make_model(tmp_path / "small", preset="small")
    meta = json.loads((folder / MODEL_JSON).read_text())
    meta["arch"] = ArchSpec.preset("tiny").to_dict()  # model.json says tiny, the weights are small's
    (folder / MODEL_JSON).write_text(json.dumps(meta))
    code = cli(["segment", "-i", volume, "-m", folder, "-o", tmp_path / "o.nii.gz"])
    assert_error(code, capsys, folder / MODEL_WEIGHTS, "another architecture")


def test_nan_weights(tmp_path: Path, volume: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = ArchSpec.preset("tiny")
    net = build_network(spec, seed=0)
    with torch.no_grad():
        next(net.parameters()).fill_(float("nan"))
    folder = save_model(tmp_path / "nan_model", net, spec, ["cord"], Preprocessing(size=(16, 16)), 0.0)
    code = cli(["segment", "-i", volume, "-m", folder, "-o", tmp_path / "o.nii.gz"])
    assert_error(code, capsys, folder / MODEL_WEIGHTS, "NaN")


def test_unknown_task_for_segment(tmp_path: Path, volume: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = make_model(tmp_path / "m2", tasks=("cord", "lesion"))
    code = cli(["segment", "-i", volume, "-m", folder, "-o", tmp_path / "o.nii.gz", "--task", "gm"])
    assert_error(code, capsys, folder / MODEL_JSON, "unknown task 'gm'", "cord, lesion")


# ---- evaluation: image/label pairs, tasks, sites ------------------------------------------------


def test_label_with_another_shape(tmp_path: Path, model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ds = make_dataset(tmp_path, label_shape=(16, 16, 5))
    assert_error(evaluate_all(model, ds), capsys, ds.label_file("c0"), "shape")


def test_label_with_another_affine(tmp_path: Path, model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ds = make_dataset(tmp_path, label_affine=np.diag([1.0, 1.0, 2.0, 1.0]))
    assert_error(evaluate_all(model, ds), capsys, ds.label_file("c0"), "affine")


def test_zero_byte_label_file(tmp_path: Path, model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ds = make_dataset(tmp_path)
    ds.label_file("c0").write_bytes(b"")
    assert_error(evaluate_all(model, ds), capsys, ds.label_file("c0"), "cannot read")


def test_empty_masks_are_valid_input_not_an_error(
    tmp_path: Path, model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # An all-background label is legitimate (a slice range without cord); it must not crash and it
    # must not count as a perfect or failed case: Dice is null when the prediction is empty too.
    ds = make_dataset(tmp_path, label_shape=SHAPE, label_affine=np.eye(4))  # c0 relabelled: all zeros
    assert evaluate_all(model, ds) == 0
    summary = json.loads((model.parent / "s.json").read_text())
    c0 = next(r for r in summary["metric_per_case"] if r["case"] == "c0")["metrics"]["cord"]
    assert c0["n_ref"] == 0 and c0["HD95"] is None
    assert (c0["Dice"] is None) == (c0["n_pred"] == 0)
    assert "Traceback" not in capsys.readouterr().err


def test_unknown_site(tmp_path: Path, model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ds = make_dataset(tmp_path)
    assert_error(
        evaluate_all(model, ds, "--site", "Z"), capsys, ds.root / "dataset.json", "unknown site 'Z'", "A, B"
    )


def test_unknown_task_for_evaluate(tmp_path: Path, model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ds = make_dataset(tmp_path)
    assert_error(
        evaluate_all(model, ds, "--task", "gm"), capsys, model / MODEL_JSON, "unknown task 'gm'", "cord"
    )


def test_model_task_the_dataset_lacks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ds = make_dataset(tmp_path)
    folder = make_model(tmp_path / "lesion_model", tasks=("lesion",))
    assert_error(evaluate_all(folder, ds), capsys, ds.root / "dataset.json", "unknown task 'lesion'")


def test_missing_dataset_folder(tmp_path: Path, model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "Dataset999_None"
    code = cli(["evaluate", "-m", model, "-d", missing])
    assert_error(code, capsys, missing, "not found")


def test_unknown_split(tmp_path: Path, model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ds = make_dataset(tmp_path)
    code = cli(["evaluate", "-m", model, "-d", ds.root, "--split", "holdout"])
    assert_error(code, capsys, "holdout", "unknown split")
