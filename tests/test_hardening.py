"""Hardening (issue 16): names read from files never become paths outside the output folder, and
bad inputs are one-line errors with exit code 2 that write nothing."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from weightzoo.cli import main
from weightzoo.errors import InputError
from weightzoo.fileio import inside, plain_name
from weightzoo.nets.unet import ArchSpec, build_network
from weightzoo.zoo.nnunet import nnunet_plans, read_nnunet_results

TRAVERSALS = ["../../../../tmp/evil/X", "/etc/X", "..", ".", "", "a\\b", "x\0y", "~root", "a\nb"]


@pytest.mark.parametrize("name", TRAVERSALS)
def test_plain_name_refuses_path_like_names(name: str) -> None:
    with pytest.raises(InputError, match="not a plain file name"):
        plain_name(name, "dataset name", "f.json")


def test_plain_name_keeps_plain_ones() -> None:
    for ok in ("Dataset501_Phantom", "nnUNetTrainer", "2d", "3d_fullres", "a.b-c_d", 0):
        assert plain_name(ok, "x") == str(ok)


def test_inside(tmp_path: Path) -> None:
    assert inside(tmp_path, tmp_path / "a" / "b") == (tmp_path / "a" / "b").resolve()
    with pytest.raises(InputError, match="outside"):
        inside(tmp_path / "out", tmp_path / "out" / ".." / "x")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "link").symlink_to(tmp_path)  # a symlink out of the folder is outside too
    with pytest.raises(InputError, match="outside"):
        inside(tmp_path / "out", tmp_path / "out" / "link" / "x")


def _checkpoint(tmp_path: Path, **crafted: object) -> Path:
    """An nnU-Net v2 trainer folder whose checkpoint carries the `crafted` names."""
    spec = ArchSpec.preset("tiny", 1, 2)  # softmax: background + cord
    net = build_network(spec, seed=0)
    dj = {"channel_names": {"0": "T2"}, "labels": {"background": 0, "cord": 1}, "file_ending": ".nii.gz"}
    plans = nnunet_plans(spec)
    plans["dataset_name"] = crafted.get("dataset_name", "Dataset501_Phantom")
    if "plans_name" in crafted:
        plans["plans_name"] = crafted["plans_name"]
    ckpt = {
        "network_weights": dict(net.state_dict()),
        "init_args": {
            "plans": plans,
            "configuration": crafted.get("configuration", "2d"),
            "fold": crafted.get("fold", 0),
            "dataset_json": dj,
        },
        "trainer_name": crafted.get("trainer_name", "nnUNetTrainer"),
        "current_epoch": 0,
        "logging": {},
    }
    path = tmp_path / "results" / "Dataset501_Phantom" / "nnUNetTrainer__nnUNetPlans__2d" / "fold_0"
    path.mkdir(parents=True)
    torch.save(copy.deepcopy(ckpt), path / "checkpoint_final.pth")
    return path.parent


@pytest.mark.parametrize("field", ["dataset_name", "trainer_name", "plans_name", "configuration", "fold"])
def test_ingest_refuses_a_checkpoint_whose_names_are_paths(tmp_path: Path, field: str, capsys) -> None:
    """The issue's attack: a name like ../../../../somewhere/X in a checkpoint is refused at ingest
    (one line naming the file, exit 2), so it never reaches `zoo export`; nothing is written."""
    folder = _checkpoint(tmp_path, **{field: "../../../../" + str(tmp_path / "evil" / "X")})
    with pytest.raises(InputError, match="not a plain file name"):
        read_nnunet_results(folder)
    rc = main(["zoo", "ingest", str(folder), "--zoo", str(tmp_path / "zoo")])
    err = capsys.readouterr().err
    assert rc == 2 and "not a plain file name" in err and "checkpoint_final.pth" in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "evil").exists()


def test_export_refuses_names_that_leave_the_output_folder(tmp_path: Path, capsys) -> None:
    """A zoo whose manifest was edited after ingest (names are re-checked on export)."""
    folder = _checkpoint(tmp_path)
    assert main(["zoo", "ingest", str(folder), "--zoo", str(tmp_path / "zoo")]) == 0
    import json
    import sqlite3

    db = sqlite3.connect(tmp_path / "zoo" / "manifest.sqlite")
    ((run_id, info),) = db.execute("SELECT run_id, info FROM runs").fetchall()
    info = json.loads(info)
    info["plans"]["dataset_name"] = "../../evil/X"
    db.execute("UPDATE runs SET info = ? WHERE run_id = ?", (json.dumps(info), run_id))
    db.commit()
    db.close()
    (ckpt,) = [
        r[0]
        for r in sqlite3.connect(tmp_path / "zoo" / "manifest.sqlite").execute(
            "SELECT ckpt_id FROM checkpoints"
        )
    ]
    rc = main(["zoo", "export", str(tmp_path / "zoo"), ckpt, str(tmp_path / "out" / "deep")])
    err = capsys.readouterr().err
    assert rc == 2 and "not a plain file name" in err, err
    assert not (tmp_path / "out" / "evil").exists() and not (tmp_path / "evil").exists()


# ---- outputs never overwrite inputs ------------------------------------------------------------------
def _image_and_model(tmp_path: Path) -> tuple[Path, Path]:
    from weightzoo.data.io import save_nifti
    from weightzoo.data.slices import Preprocessing
    from weightzoo.segmenter import save_model

    img = tmp_path / "t2.nii.gz"
    save_nifti(img, np.random.default_rng(0).random((32, 32, 3)).astype(np.float32), np.eye(4))
    spec = ArchSpec.preset("tiny")
    model = save_model(
        tmp_path / "m", build_network(spec, seed=0), spec, ["cord"], Preprocessing(size=(32, 32)), 0.0
    )
    return img, Path(model)


def test_segment_never_overwrites_its_input(tmp_path: Path, capsys) -> None:
    """-o naming the input (directly, through a symlink, or a hard link), a model file, or a folder:
    one line, exit 2, and every input byte-identical afterwards."""
    img, model = _image_and_model(tmp_path)
    (tmp_path / "link.nii.gz").symlink_to(img)
    os.link(img, tmp_path / "hard.nii.gz")
    before = {p: p.read_bytes() for p in [img, *model.iterdir()]}
    outs = [
        img,
        tmp_path / "link.nii.gz",
        tmp_path / "hard.nii.gz",
        tmp_path / "sub" / ".." / "t2.nii.gz",
        tmp_path,
    ]
    for out in outs:
        rc = main(["segment", "-i", str(img), "-m", str(model), "-o", str(out)])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and len(err.splitlines()) == 1, (out, err)
        assert "overwrite the input" in err or "existing folder" in err, err
    (tmp_path / "qc_is_a_file").write_text("x")
    rc = main(
        [
            "segment",
            "-i",
            str(img),
            "-m",
            str(model),
            "-o",
            str(tmp_path / "o.nii.gz"),
            "--qc",
            str(tmp_path / "qc_is_a_file"),
        ]
    )
    assert rc == 2 and "not a folder" in capsys.readouterr().err
    assert not (tmp_path / "o.nii.gz").exists()
    assert all(p.read_bytes() == b for p, b in before.items())


# ---- numbers -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_or_inf_in_an_image_is_an_error(tmp_path: Path, bad: float, capsys) -> None:
    """One NaN voxel used to give an all-zero mask with exit 0 (issue 16)."""
    import tifffile

    from weightzoo.data.io import save_nifti

    img, model = _image_and_model(tmp_path)
    arr = np.random.default_rng(0).random((32, 32, 3)).astype(np.float32)
    arr[5, 6, 0] = bad
    save_nifti(img, arr, np.eye(4))
    tif = tmp_path / "x.tif"
    tifffile.imwrite(tif, arr[..., 0])
    for src, out in ((img, "o.nii.gz"), (tif, "o.tif")):
        rc = main(["segment", "-i", str(src), "-m", str(model), "-o", str(tmp_path / out)])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and "NaN/inf" in err and str(src) in err and len(err.splitlines()) == 1, err
        assert not (tmp_path / out).exists()


def test_a_diverging_run_stops_and_writes_no_model(tiny_phantom_dataset, tmp_path: Path, capsys) -> None:
    """`--lr 1e30` used to save a NaN model with exit 0; now it stops with one line, exit 2, and no
    model.json (the last good checkpoint stays)."""
    out = tmp_path / "run"
    args = ["train", "-d", str(tiny_phantom_dataset.root), "-t", "cord", "--preset", "tiny", "--size", "32"]
    rc = main([*args, "--steps", "6", "--batch-size", "2", "--lr", "1e30", "-o", str(out), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "diverged" in err and len(err.splitlines()) == 1, err
    assert not (out / "model.json").exists()


@pytest.mark.parametrize("dtype", [torch.bool, torch.int32, torch.uint8])
def test_weights_of_the_wrong_dtype_are_refused(tmp_path: Path, dtype: torch.dtype, capsys) -> None:
    """bool/int weights used to give an all-ones mask from `segment` with exit 0."""
    from safetensors.torch import load_file, save_file

    img, model = _image_and_model(tmp_path)
    w = load_file(model / "model.safetensors")
    first = sorted(w)[0]
    w[first] = w[first].to(dtype)
    save_file(w, model / "model.safetensors")
    rc = main(["segment", "-i", str(img), "-m", str(model), "-o", str(tmp_path / "o.nii.gz")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "wrong dtype" in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "o.nii.gz").exists()


def test_a_split_file_with_a_subject_in_two_splits_is_refused(
    tiny_phantom_dataset, tmp_path: Path, capsys
) -> None:
    """A test leak used to be accepted as is."""
    import json
    import shutil

    from weightzoo.data.raw import SPLITS_FILE, RawDataset

    root = tmp_path / tiny_phantom_dataset.root.name
    shutil.copytree(tiny_phantom_dataset.root, root)
    s = json.loads((root / SPLITS_FILE).read_text())
    s["test"].append(s["train"][0])
    (root / SPLITS_FILE).write_text(json.dumps(s))
    with pytest.raises(InputError, match="in both the train and the test split"):
        RawDataset.open(root).splits()
    rc = main(
        ["train", "-d", str(root), "-t", "cord", "--steps", "1", "--size", "32", "-o", str(tmp_path / "m")]
    )
    err = capsys.readouterr().err.strip()
    assert rc == 2 and SPLITS_FILE in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "m").exists()


# ---- edited files and resource caps ------------------------------------------------------------------
def _edit(d: dict, path: list, value: object) -> dict:
    d = copy.deepcopy(d)
    node = d
    for k in path[:-1]:
        node = node[k]
    if value is KeyError:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return d


MODEL_EDITS = [
    (["preprocessing", "size"], [1000000, 1000000]),
    (["preprocessing", "size"], "big"),
    (["preprocessing", "axis"], 7),
    (["arch", "arch_kwargs", "extra_kwarg"], 1),
    (["arch", "arch_kwargs", "conv_op"], ["torch.nn.modules.conv.Conv2d"]),
    (["arch", "arch_kwargs", "features_per_stage"], [-4, 8, 16]),
    (["arch", "arch_kwargs", "features_per_stage"], ["4", 8, 16]),
    (["arch", "arch_kwargs", "n_stages"], 50),
    (["arch", "arch_kwargs", "features_per_stage"], [4, 8, 10**6]),
]


@pytest.mark.parametrize("path,value", MODEL_EDITS, ids=[f"{'.'.join(p)}={v!r:.20}" for p, v in MODEL_EDITS])
def test_edited_model_json_is_one_line_exit_2(tmp_path: Path, path: list, value: object, capsys) -> None:
    import json

    img, model = _image_and_model(tmp_path)
    meta = json.loads((model / "model.json").read_text())
    if path[0] not in meta:
        pytest.fail(f"model.json has no {path[0]} (keys {sorted(meta)})")
    (model / "model.json").write_text(json.dumps(_edit(meta, path, value)))
    rc = main(["segment", "-i", str(img), "-m", str(model), "-o", str(tmp_path / "o.nii.gz")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "model.json" in err, err  # the message names the file
    assert not (tmp_path / "o.nii.gz").exists()


def test_a_huge_grid_fails_at_once(tiny_phantom_dataset, tmp_path: Path, capsys) -> None:
    """seeds: 100000000 used to plan for > 10 min and 5.8 GB of RAM, printing nothing."""
    import time

    import yaml

    (tmp_path / "g.yaml").write_text(
        yaml.safe_dump({"tasks": ["cord"], "sites": ["A"], "seeds": 100_000_000})
    )
    t = time.perf_counter()
    rc = main(["zoo", "build", "--dataset", str(tiny_phantom_dataset.root), "--grid", str(tmp_path / "g.yaml"),
               "--zoo", str(tmp_path / "zoo"), "--no-progress"])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "runs a grid may plan" in err and time.perf_counter() - t < 10, err
    (tmp_path / "g.yaml").write_text(
        yaml.safe_dump(
            {"tasks": ["cord"], "sites": ["A"], "seeds": 2000, "lr": [0.1 * i + 0.1 for i in range(600)]}
        )
    )
    rc = main(["zoo", "build", "--dataset", str(tiny_phantom_dataset.root), "--grid", str(tmp_path / "g.yaml"),
               "--zoo", str(tmp_path / "zoo2"), "--no-progress"])  # fmt: skip
    assert rc == 2 and "1,200,000 runs" in capsys.readouterr().err
    assert not (tmp_path / "zoo2").exists()


def test_bad_device_and_mode_fail_before_anything_is_written(
    tiny_phantom_dataset, tmp_path: Path, capsys
) -> None:
    """`--device bogus` used to give a RuntimeError traceback; `zoo build --mode bogus` registered runs
    before it failed."""
    import yaml

    root = str(tiny_phantom_dataset.root)
    rc = main(["train", "-d", root, "-t", "cord", "--steps", "1", "--size", "32", "--device", "bogus",
               "-o", str(tmp_path / "m")])  # fmt: skip
    assert rc == 2 and "unknown device 'bogus'" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()
    (tmp_path / "g.yaml").write_text(yaml.safe_dump({"tasks": ["cord"], "sites": ["A"], "steps": 2}))
    for extra, msg in (
        (["--mode", "bogus"], "unknown training mode"),
        (["--device", "bogus"], "unknown device"),
    ):
        rc = main(["zoo", "build", "--dataset", root, "--grid", str(tmp_path / "g.yaml"), "--zoo",
                   str(tmp_path / "zoo"), "--no-progress", *extra])  # fmt: skip
        assert rc == 2 and msg in capsys.readouterr().err
        assert not (tmp_path / "zoo").exists()


@pytest.mark.parametrize("cmd", [["data", "import-wbc", "src", "out"], ["data", "import-folder", "src"]])
def test_limit_0_is_a_usage_error(cmd: list[str], tmp_path: Path, capsys) -> None:
    rc = main([*cmd, "--limit", "0"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "--limit" in err and len(err.splitlines()) == 1, err


def test_a_task_absent_from_every_training_mask_is_an_error(
    tiny_phantom_dataset, tmp_path: Path, capsys
) -> None:
    """A task label value that no training mask holds would train to Dice 0 with exit 0."""
    import json
    import shutil

    from weightzoo.cli import main

    root = tmp_path / tiny_phantom_dataset.root.name
    shutil.copytree(tiny_phantom_dataset.root, root)
    meta = json.loads((root / "dataset.json").read_text())
    meta["labels"]["ghost"] = 9
    meta["tasks"]["ghost"] = [9]
    (root / "dataset.json").write_text(json.dumps(meta))
    out = tmp_path / "model"
    argv = ["train", "--dataset", str(root), "--task", "ghost", "--preset", "tiny", "--steps", "2"]
    rc = main([*argv, "--size", "32", "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "task 'ghost'" in err and "dataset.json" in err, err
    assert not (out / "model.json").exists()
