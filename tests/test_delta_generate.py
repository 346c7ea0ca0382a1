"""The delta generator (generator v2): site embeddings, training on a fine-tune zoo, sampling for a
seen, an unseen (unlabelled images only) and an unknown site, checks, export to nnU-Net, the CLI and
its errors. Tiny settings on the shared `finetune_zoo` fixture, one thread."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from weightzoo.cli import main
from weightzoo.errors import ModelError
from weightzoo.generate.delta import DeltaDenoiser, DeltaGenConfig, train_delta_generator
from weightzoo.generate.delta_sample import DeltaGenerator
from weightzoo.generate.site_embedding import folder_images, image_features, site_embedding
from weightzoo.segmenter import load_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def delta_gen(finetune_zoo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dgen") / "gen"
    train_delta_generator(finetune_zoo, out, DeltaGenConfig(steps=60, hidden=64, depth=1), log=lambda m: None)
    return out


def test_site_embedding_is_invariant_to_image_order(phantom_base: Path) -> None:
    from weightzoo.generate.delta import base_network
    from weightzoo.zoo.base import load_base

    net = base_network(load_base(phantom_base))
    imgs = np.random.default_rng(0).normal(size=(7, 1, 32, 32)).astype(np.float32)
    f = image_features(net, imgs)
    assert f.shape == (7, 2 * (4 + 8 + 16))
    e = site_embedding(f)
    for perm in ([6, 5, 4, 3, 2, 1, 0], [3, 0, 6, 1, 5, 2, 4]):
        assert torch.equal(site_embedding(image_features(net, imgs[perm])), e)
    assert not torch.equal(site_embedding(f[:3]), e)  # it does depend on WHICH images


def test_training_uses_train_runs_and_writes_a_self_contained_folder(
    delta_gen: Path, finetune_zoo: Path
) -> None:
    from weightzoo.zoo import Zoo

    meta = json.loads((delta_gen / "generator.json").read_text())
    zoo = Zoo(finetune_zoo)
    splits = {r.run_id: r.split for r in zoo.runs()}
    assert meta["kind"] == "delta" and meta["train_runs"]
    assert all(splits[r] == "train" for r in meta["train_runs"])
    assert all(zoo.run(r).config["trainable"] == "norm_seg" for r in meta["train_runs"])
    assert sorted(meta["sites"]) == ["A", "B"]
    assert (delta_gen / "base.safetensors").is_file()
    # a second call is a no-op; another config in the same folder is refused
    res = train_delta_generator(finetune_zoo, delta_gen, DeltaGenConfig(steps=60, hidden=64, depth=1))
    assert res.skipped
    with pytest.raises(ModelError, match="trained differently"):
        train_delta_generator(finetune_zoo, delta_gen, DeltaGenConfig(steps=61, hidden=64, depth=1))


def test_an_untrained_generator_gives_the_mean_delta(delta_gen: Path) -> None:
    g = DeltaGenerator.load(delta_gen)
    g.model = DeltaDenoiser(g.layout.numel, len(g.meta["tasks"]), len(g.mu), 64, 1).eval()  # output layer = 0
    res = g.sample(["cord", "gm", "canal"], None, candidates=2, seed=3)
    expect = g.layout.state(g.mean, ["cord", "gm", "canal"])
    for st in res.states:
        assert all(torch.allclose(st[k], expect[k]) for k in expect)


def test_sampling_is_seeded_and_only_changes_the_subset(delta_gen: Path) -> None:
    from weightzoo.zoo.base import is_trainable

    g = DeltaGenerator.load(delta_gen)
    a = g.sample(["cord"], g.seen_site("A"), candidates=3, seed=1)
    b = g.sample(["cord"], g.seen_site("A"), candidates=3, seed=1)
    assert all(torch.equal(x[k], y[k]) for x, y in zip(a.states, b.states, strict=True) for k in x)
    assert not torch.equal(
        a.states[0]["decoder.seg_layers.1.weight"], a.states[1]["decoder.seg_layers.1.weight"]
    )
    base = g.base.restricted(["cord"])[1]
    changed = {k for k in base if not torch.equal(a.states[0][k], base[k])}
    assert changed and all(is_trainable(k, "norm_seg") for k in changed)
    g.check(a.states[0])
    bad = dict(a.states[0])
    bad["decoder.seg_layers.1.weight"] = bad["decoder.seg_layers.1.weight"] * 100
    with pytest.raises(ModelError, match="RMS"):
        g.check(bad)


def test_unseen_site_from_unlabelled_images_via_cli(
    delta_gen: Path, phantom_dataset_4sites, tmp_path: Path, capsys
) -> None:
    """Site D was never in the zoo: a folder of its images (no masks) is enough, with the zoo and
    its dataset out of reach; the result is a model folder that exports to nnU-Net."""
    gen = tmp_path / "gen"
    shutil.copytree(delta_gen, gen)
    meta = json.loads((gen / "generator.json").read_text())
    meta.update(zoo="/nonexistent/zoo", dataset_path="/nonexistent/data")
    (gen / "generator.json").write_text(json.dumps(meta))
    imgs = tmp_path / "site_D"
    imgs.mkdir()
    for f in sorted((phantom_dataset_4sites.root / "imagesTr").glob("phD_*_0000.nii.gz"))[:2]:
        shutil.copy(f, imgs / f.name)
    assert len(folder_images(imgs, DeltaGenerator.load(gen).prep)) == 8  # 2 volumes x 4 slices
    out = tmp_path / "net"
    args = ["generate", "sample", "-g", str(gen), "--task", "cord,gm,canal", "--site-images", str(imgs)]
    assert main([*args, "--candidates", "4", "--out", str(out)]) == 0
    seg = load_model(out)
    assert seg.tasks == ["cord", "gm", "canal"]
    info = json.loads((out / "model.json").read_text())["info"]
    assert info["site"].startswith("images:") and info["kind"] == "delta"
    assert main(["zoo", "export", str(out), str(tmp_path / "nnunet")]) == 0
    assert list((tmp_path / "nnunet").rglob("checkpoint_final.pth"))


def test_cli_train_sample_select_and_errors(
    finetune_zoo: Path, delta_gen: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "net"
    assert (
        main(
            [
                "generate",
                "sample",
                "-g",
                str(delta_gen),
                "--task",
                "cord",
                "--site",
                "A",
                "--candidates",
                "3",
                "--select-on",
                "val",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    info = json.loads((out / "model.json").read_text())["info"]
    assert info["selected_on"] == "val" and len(info["val_dice_candidates"]) == 3
    capsys.readouterr()
    bad = [
        ["--task", "lesion", "--site", "A"],  # not a task of the base
        ["--task", "cord", "--site", "Z"],  # unknown site
        ["--task", "cord", "--site", "A", "--select-on", "test"],  # never select on test
        ["--task", "cord", "--site-images", str(tmp_path)],  # a folder without images
        ["--task", "cord", "--site", "A", "--site-images", str(tmp_path)],  # two ways at once
        ["--task", "cord", "--site", "A", "--target-dice", "0.9"],  # a G.pt-style option
    ]
    for extra in bad:
        rc = main(["generate", "sample", "-g", str(delta_gen), *extra, "--out", str(tmp_path / "x")])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and len(err.splitlines()) == 1, (extra, err)


def test_delta_generator_refuses_a_random_init_zoo(tiny_phantom_dataset, tmp_path: Path, capsys) -> None:
    from weightzoo.zoo.build import build_zoo

    grid = {
        "tasks": ["cord"],
        "sites": "each",
        "seeds": 2,
        "preset": "tiny",
        "steps": 3,
        "size": 32,
        "batch_size": 2,
        "checkpoints": 0,
    }
    build_zoo(tiny_phantom_dataset, grid, tmp_path / "zoo", progress=False, log=lambda m: None)
    capsys.readouterr()
    rc = main(
        ["generate", "train", "--kind", "delta", "--zoo", str(tmp_path / "zoo"), "--out", str(tmp_path / "g")]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "no base network" in err


def test_demo_section_shows_soups_and_generated_next_to_the_zoo_best(
    tiny_phantom_dataset, tmp_path: Path
) -> None:
    from weightzoo.evaluate.report import Report
    from weightzoo.generate.delta_demo import demo_delta

    rep = Report(tmp_path / "report", "demo")
    out = demo_delta(tmp_path / "demo", tiny_phantom_dataset, rep, log=str, seconds_budget=1)
    names = [r["network"] for r in out["rows"]]
    assert names[0] == "base alone" and names[1].startswith("zoo best")
    assert any("soup" in n for n in names) and names[-1].startswith("generated")
    assert all(0.0 <= r["test Dice"] <= 1.0 for r in out["rows"])
    assert out["unseen_site"] == "B" and len(out["unseen_rows"]) == 2
    assert load_model(tmp_path / "demo" / "base_route" / "generated_net").tasks == ["cord"]
    assert "Models from one base" in rep.write().read_text()


def test_generate_eval_for_delta_generators(
    delta_gen: Path, finetune_zoo: Path, tiny_phantom_dataset, tmp_path: Path
) -> None:
    args = ["generate", "eval", "-g", str(delta_gen), "--zoo", str(finetune_zoo)]
    args += ["--dataset", str(tiny_phantom_dataset.root), "--out", str(tmp_path / "ev"), "--candidates", "2"]
    assert main(args) == 0
    res = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert res["seen"] and not res["unseen"]  # the fixture zoo covers both sites
    row = res["seen"][0]
    for k in ("base", "zoo best (val)", "uniform soup", "greedy soup", "generated one-shot", "noisy nearest"):
        assert k in row
    assert all(0.0 <= v <= 1.0 or math.isnan(v) for v in row["generated one-shot"])
    assert (tmp_path / "ev" / "report.html").is_file()
