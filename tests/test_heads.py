"""Site heads: the backbone/head split, head swaps, site fallback, export, add-site, resume, CLI, FiLM.

One heads model is trained once per module on the tiny 2-site phantom (tiny preset, 32 px, a few
steps) with site A only; site B is then added few-shot, as a site unseen in backbone training.
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from weightzoo.data.raw import RawDataset
from weightzoo.data.slices import Preprocessing, SliceSet, load_slices
from weightzoo.errors import InputError, ModelError, UnknownNameError
from weightzoo.heads import (
    UNIVERSAL,
    HeadedModel,
    HeadedSegmenter,
    SiteWarning,
    add_site,
    evaluate_headed,
    head_names,
    load_any_model,
    train_heads,
)
from weightzoo.heads.film import FiLMSegmenter, FiLMUNet, train_film
from weightzoo.heads.model import BACKBONE_FILE, HEADS_JSON
from weightzoo.heads.phase import SitePools, site_balanced_indices
from weightzoo.heads.segmenter import export_head
from weightzoo.nets.unet import ArchSpec, build_network, real_state_dict
from weightzoo.segmenter import NetSegmenter, load_model, save_model
from weightzoo.train.config import TrainConfig

TASKS = ["cord", "gm"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Tiny nets: one torch thread is faster, and much faster on a busy machine."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def cfg(**kw: object) -> TrainConfig:
    base = dict(
        tasks=TASKS, preset="tiny", optimizer="adam", lr=1e-2, steps=6, batch_size=4, size=(32, 32),
        val_every=3, checkpoint_every=2, device="cpu",
    )  # fmt: skip
    base.update(kw)
    return TrainConfig(**base)  # type: ignore[arg-type]


TRAIN_KW = dict(head_stages=1, sites=["A"], head_steps=4)


@pytest.fixture(scope="module")
def trained(tiny_phantom_dataset: RawDataset, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Backbone + universal head + head A (site A only); read-only for tests."""
    out = tmp_path_factory.mktemp("heads") / "cord"
    res = train_heads(tiny_phantom_dataset, cfg(), out, **TRAIN_KW)
    assert res.finished and res.phases_run == ["backbone", "head-A"]
    return out


@pytest.fixture(scope="module")
def with_b(trained: Path, tiny_phantom_dataset: RawDataset, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`trained` + a few-shot head for site B (2 subjects), in a copy."""
    out = tmp_path_factory.mktemp("heads_b") / "cord"
    shutil.copytree(trained, out)
    add_site(out, tiny_phantom_dataset, "B", shots=2, steps=4)
    return out


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def images(n: int = 3, channels: int = 1) -> np.ndarray:
    return np.random.default_rng(0).normal(size=(n, channels, 32, 32)).astype(np.float32)


# ---- the split --------------------------------------------------------------------------------------
def test_head_split_follows_decoder_stages() -> None:
    spec = ArchSpec.preset("tiny", 1, 2)  # 2 decoder stages
    all_names = set(real_state_dict(build_network(spec)))
    n0, n1, n2 = (set(head_names(spec, n)) for n in (0, 1, 2))
    assert n0 == {"decoder.seg_layers.1.weight", "decoder.seg_layers.1.bias"}
    assert n0 < n1 < n2 < all_names
    assert {k for k in n1 - n0} == {
        k for k in all_names if k.startswith(("decoder.stages.1.", "decoder.transpconvs.1."))
    }
    assert not any(k.startswith("encoder.") or k.startswith("decoder.seg_layers.0.") for k in n2)
    with pytest.raises(InputError, match=r"head_stages=3 is outside 0\.\.2"):
        head_names(spec, 3)


def test_head_swap_changes_only_head_params(with_b: Path) -> None:
    hm = HeadedModel.load(with_b)
    seg = HeadedSegmenter(hm, "A")
    before = {k: v.clone() for k, v in real_state_dict(seg.net).items()}
    out_a = seg.predict_batch(images())
    seg.use("B")
    after = real_state_dict(seg.net)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and changed <= set(hm.head_tensor_names)
    assert seg.head == "B" and not np.array_equal(out_a, seg.predict_batch(images()))
    fresh = HeadedSegmenter(hm, "B")  # swapping in place == building with that head
    assert np.array_equal(fresh.predict_batch(images()), seg.predict_batch(images()))


def test_unknown_site_falls_back_to_universal_with_warning(with_b: Path) -> None:
    with pytest.warns(
        SiteWarning, match=r"site 'H' has no head; using the universal head \(known sites: A, B\)"
    ):
        seg = load_any_model(with_b, site="H", device="cpu")
    assert isinstance(seg, HeadedSegmenter) and seg.head == UNIVERSAL
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no site given: universal head, silently (documented choice)
        universal = load_any_model(with_b, device="cpu")
    assert np.array_equal(seg.predict_batch(images()), universal.predict_batch(images()))


def test_plain_model_folder_loads_and_warns_for_a_new_site(tmp_path: Path) -> None:
    spec = ArchSpec.preset("tiny", 1, 1)
    save_model(
        tmp_path / "m",
        build_network(spec, 0),
        spec,
        ["cord"],
        Preprocessing(size=(32, 32)),
        0.0,
        info={"sites": ["A"]},
    )
    assert isinstance(load_any_model(tmp_path / "m", site="A", device="cpu"), NetSegmenter)
    with pytest.warns(SiteWarning, match="trained on sites A; site 'H' is new to it"):
        load_any_model(tmp_path / "m", site="H", device="cpu")


# ---- files ------------------------------------------------------------------------------------------
def test_add_site_never_touches_backbone_or_other_heads(
    trained: Path, with_b: Path, tiny_phantom_dataset: RawDataset
) -> None:
    for rel in (BACKBONE_FILE, "heads/universal.safetensors", "heads/A.safetensors"):
        assert sha(trained / rel) == sha(with_b / rel), rel
    hm = HeadedModel.load(with_b)
    info = hm.head_info["B"]
    assert hm.sites() == ["A", "B"] and info["shots"] == 2 and len(info["subjects"]) == 2
    train_b = {tiny_phantom_dataset.subject(c) for c in tiny_phantom_dataset.cases_in("train", ["B"])}
    assert set(info["subjects"]) <= train_b  # k labelled subjects from the new site's TRAIN split
    assert hm.head_n_params("B") == hm.head_n_params(UNIVERSAL) < sum(v.numel() for v in hm.backbone.values())
    assert not (with_b / ".runs").exists()


def test_export_loads_back_with_identical_outputs(with_b: Path, tmp_path: Path) -> None:
    out = export_head(with_b, "B", tmp_path / "exp")
    plain = load_model(out, "cpu")
    headed = HeadedSegmenter(HeadedModel.load(with_b), "B")
    assert np.array_equal(plain.predict_batch(images()), headed.predict_batch(images()))
    assert plain.tasks == TASKS and plain.preprocessing == headed.preprocessing
    from weightzoo.zoo.nnunet import read_nnunet_results

    (dataset_dir,) = (out / "nnUNet_results").iterdir()  # nnUNet_results/DatasetXXX_Name/<trainer>/
    (ck,) = read_nnunet_results(dataset_dir)
    ref = HeadedModel.load(with_b).full_state("B")
    assert ck.tasks == TASKS and all(torch.equal(ck.state[k], ref[k]) for k in ref)
    with pytest.raises(UnknownNameError, match="unknown head 'Q' — choose one of: A, B, universal"):
        export_head(with_b, "Q", tmp_path / "exp2")


def test_corrupt_or_mismatched_files_are_one_line_errors(with_b: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(with_b, bad)
    (bad / "heads" / "B.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ModelError, match="cannot read head 'B' weights"):
        HeadedModel.load(bad)
    shutil.copy(with_b / "heads" / "A.safetensors", bad / "heads" / "B.safetensors")
    with pytest.raises(ModelError, match=r"head 'B' does not match heads\.json"):
        HeadedModel.load(bad)
    shutil.copy(with_b / "heads" / "B.safetensors", bad / "heads" / "B.safetensors")
    meta = json.loads((bad / HEADS_JSON).read_text())
    for key in ("file", "backbone_file"):  # names from heads.json never leave the folder
        edited = copy.deepcopy(meta)
        if key == "file":
            edited["heads"]["B"]["file"] = "../../outside.safetensors"
        else:
            edited["backbone_file"] = "/etc/passwd"
        (bad / HEADS_JSON).write_text(json.dumps(edited))
        with pytest.raises(InputError, match="outside the output folder"):
            HeadedModel.load(bad)
    m = HeadedModel.load(with_b)
    with pytest.raises(InputError, match="cannot name a head"):  # a site name that is a path
        m.set_head("../x", m.heads["B"])
    (bad / HEADS_JSON).write_text("{}")
    with pytest.raises(ModelError, match="not a weightzoo heads description"):
        HeadedModel.load(bad)
    with pytest.raises(ModelError, match="heads model folder not found"):
        HeadedModel.load(tmp_path / "nowhere")


def test_add_site_bad_inputs(with_b: Path, tiny_phantom_dataset: RawDataset, tmp_path: Path) -> None:
    copy = tmp_path / "m"
    shutil.copytree(with_b, copy)
    with pytest.raises(ModelError, match="already has a head for site 'B'"):
        add_site(copy, tiny_phantom_dataset, "B", shots=1, steps=1)
    with pytest.raises(InputError, match=r"--shots 9, but site 'B' has 4 training subject\(s\)"):
        add_site(copy, tiny_phantom_dataset, "B", shots=9, steps=1, head_name="B2")
    with pytest.raises(UnknownNameError, match="unknown site 'Z'"):
        add_site(copy, tiny_phantom_dataset, "Z", shots=1)


# ---- training ---------------------------------------------------------------------------------------
def test_resume_after_kills_gives_identical_weights(
    trained: Path, tiny_phantom_dataset: RawDataset, tmp_path: Path
) -> None:
    out = tmp_path / "r"
    first = train_heads(tiny_phantom_dataset, cfg(), out, stop_after=3, **TRAIN_KW)  # killed in (a)
    assert not first.finished and (out / ".runs" / "backbone" / "checkpoint_latest.safetensors").exists()
    # resumes (a) at step 2 (its checkpoint), finishes it (4 steps), is killed in (b) after 3
    second = train_heads(tiny_phantom_dataset, cfg(), out, stop_after=7, **TRAIN_KW)
    assert not second.finished and second.phases_run == ["backbone", "head-A"]
    assert (out / ".runs" / "head-A" / "checkpoint_latest.safetensors").exists()
    third = train_heads(tiny_phantom_dataset, cfg(), out, **TRAIN_KW)
    assert third.finished and third.phases_run == ["head-A"]
    a, b = HeadedModel.load(out), HeadedModel.load(trained)
    assert all(torch.equal(a.backbone[k], b.backbone[k]) for k in b.backbone)
    for h in b.heads:
        assert all(torch.equal(a.heads[h][k], b.heads[h][k]) for k in b.heads[h])
    again = train_heads(tiny_phantom_dataset, cfg(), out, **TRAIN_KW)
    assert again.finished and again.phases_run == []  # finished: nothing re-trained
    with pytest.raises(ModelError, match="holds a heads model of another run"):
        train_heads(tiny_phantom_dataset, cfg(seed=1), out, **TRAIN_KW)


def test_joint_unfreeze_keeps_one_shared_backbone(tiny_phantom_dataset: RawDataset, tmp_path: Path) -> None:
    res = train_heads(
        tiny_phantom_dataset, cfg(steps=3), tmp_path / "j", head_stages=0, head_steps=2, unfreeze_steps=2
    )
    assert res.phases_run == ["backbone", "head-A", "head-B", "joint"]
    hm = HeadedModel.load(tmp_path / "j")  # every head re-saved against the new backbone (load checks it)
    assert hm.sites() == ["A", "B"] and "joint" in hm.head_info["A"]["route"]


def test_site_balanced_sampling_ignores_site_size() -> None:
    n_a, n_b = 90, 10
    labels = np.zeros((n_a + n_b, 1, 4, 4), np.uint8)
    labels[::3, 0, 1, 1] = 1
    meta = [
        {"case": f"c{i}", "subject": f"s{i}", "site": "A" if i < n_a else "B", "slice": 0}
        for i in range(n_a + n_b)
    ]
    s = SliceSet(np.zeros((n_a + n_b, 1, 4, 4), np.float32), labels, ["t"], meta)
    g = torch.Generator().manual_seed(0)
    idx = torch.cat([site_balanced_indices(g, SitePools.of(s), 8, 0.33) for _ in range(300)])
    frac_b = float((idx >= n_a).float().mean())
    assert 0.45 < frac_b < 0.55  # uniform sampling would give 0.10


def test_evaluate_headed_routes_each_site_to_its_head(with_b: Path, tiny_phantom_dataset: RawDataset) -> None:
    summ = evaluate_headed(with_b, tiny_phantom_dataset, split="test", device="cpu")
    assert summ["heads_used"] == {"A": "A", "B": "B"} and set(summ["per_site"]) == {"A", "B"}
    assert summ["n_cases"] == len(tiny_phantom_dataset.cases_in("test"))


# ---- FiLM baseline ----------------------------------------------------------------------------------
def test_film_starts_as_the_plain_network_and_conditions_per_site(tiny_phantom_dataset: RawDataset) -> None:
    spec = ArchSpec.preset("tiny", 1, 2)
    plain = build_network(spec, seed=0).eval()
    film = FiLMUNet(build_network(spec, seed=0), spec, ["A", "B"]).eval()
    x = torch.as_tensor(images())
    with torch.no_grad():
        assert torch.allclose(film(x, 1), plain(x))
        film.film.weight[2].normal_()  # site B's row only
        assert torch.allclose(film(x, 1), plain(x)) and not torch.allclose(film(x, 2), plain(x))
    assert film.site_index("H") == 0 and film.n_params_per_site() == 2 * (4 + 8 + 16 + 8 + 4)
    prep = Preprocessing(size=(32, 32))
    train = load_slices(tiny_phantom_dataset, TASKS, "train", prep=prep)
    model, res = train_film(train, None, cfg(steps=2))
    seg = FiLMSegmenter(model, spec, TASKS, prep, "B")
    assert res.finished and seg.predict_batch(images()).shape == (3, 2, 32, 32)


# ---- CLI --------------------------------------------------------------------------------------------
def cli(args: list[object]) -> int:
    from weightzoo.cli import main

    return main([str(a) for a in args])


def test_cli_train_ls_export_segment(
    tiny_phantom_dataset: RawDataset, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "heads" / "cord"
    common = [
        "--preset",
        "tiny",
        "--steps",
        4,
        "--batch-size",
        4,
        "--size",
        32,
        "--device",
        "cpu",
        "--no-progress",
    ]
    rc = cli(
        [
            "heads",
            "train",
            "--dataset",
            tiny_phantom_dataset.root,
            "--task",
            "cord",
            "--head-stages",
            1,
            "--out",
            out,
            "--head-steps",
            2,
            *common,
        ]
    )
    assert rc == 0 and (out / HEADS_JSON).exists()
    assert cli(["heads", "ls", out]) == 0
    listing = capsys.readouterr().out
    assert "universal" in listing and "frozen" in listing and "backbone" in listing
    assert cli(["heads", "export", out, "--site", "B", tmp_path / "exp", "--no-nnunet"]) == 0
    assert (tmp_path / "exp" / "model.json").exists() and not (tmp_path / "exp" / "nnUNet_results").exists()
    case = tiny_phantom_dataset.cases_in("test", ["B"])[0]
    image = tiny_phantom_dataset.image_files(case)[0]
    assert cli(["segment", "-i", image, "-m", out, "--site", "B", "-o", tmp_path / "seg.nii.gz"]) == 0
    assert cli(["segment", "-i", image, "-m", tmp_path / "exp", "-o", tmp_path / "seg_exp.nii.gz"]) == 0
    import nibabel as nib

    a, b = (np.asarray(nib.load(str(tmp_path / f)).dataobj) for f in ("seg.nii.gz", "seg_exp.nii.gz"))
    assert a.shape == nib.load(str(image)).shape and np.array_equal(a, b)
    capsys.readouterr()
    assert cli(["heads", "export", out, "--site", "Q", tmp_path / "exp2"]) == 2
    assert "unknown head 'Q' — choose one of: A, B, universal" in capsys.readouterr().err
    assert cli(["heads", "ls", tmp_path / "nowhere"]) == 2
    assert "heads model folder not found" in capsys.readouterr().err
    assert (
        cli(
            [
                "heads",
                "train",
                "--dataset",
                tiny_phantom_dataset.root,
                "--task",
                "cord",
                "--head-stages",
                5,
                "--out",
                tmp_path / "x",
                *common,
            ]
        )
        == 2
    )
    assert "head_stages=5 is outside 0..2" in capsys.readouterr().err
    assert (
        cli(
            [
                "heads",
                "add-site",
                "--model",
                out,
                "--dataset",
                tiny_phantom_dataset.root,
                "--site",
                "B",
                "--name",
                "B5",
                "--shots",
                50,
            ]
        )
        == 2
    )
    assert "give --shots between 1 and 4" in capsys.readouterr().err


def test_demo_heads_adds_a_universal_vs_heads_table(tiny_phantom_dataset: RawDataset, tmp_path: Path) -> None:
    from weightzoo.evaluate.report import Report
    from weightzoo.heads.demo import demo_heads

    report = Report(tmp_path, "demo")
    out = demo_heads(tmp_path, tiny_phantom_dataset, report, log=lambda s: None, seconds_budget=0)
    assert out["steps"] == 40 and {r["site"] for r in out["rows"]} == {"A", "B"}
    assert all(0 <= r["site head Dice"] <= 1 for r in out["rows"])
    html = report.write().read_text()
    assert "Universal model vs site heads" in html and "site head Dice" in html
    assert HeadedModel.load(tmp_path / "heads").sites() == ["A", "B"]
