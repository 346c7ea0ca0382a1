"""weightzoo.hyper: the hypernetwork contract (identity at init, magnitude-invariant encoding, per-sample
weights, gradients), the functional U-Net (exact to PlainConvUNet, exact FLOPs), training, resuming,
the CLI and its errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from weightzoo.cli import main
from weightzoo.errors import InputError, ModelError
from weightzoo.hyper import CosSinEncoding, HyperConfig, HyperNet, HyperUNet, RawEncoding, train_hyper
from weightzoo.hyper.model import load_hyper
from weightzoo.nets.functional_unet import he_init, param_shapes, unet_flops, unet_forward
from weightzoo.nets.unet import SCALE_SPACE_UNET, ArchSpec, build_network, real_state_dict
from weightzoo.train.config import TrainConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SHAPES = {"conv.weight": (8, 2, 3, 3), "conv.bias": (8,), "norm.weight": (8,)}


def _theta0() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}


def _perturb(module: torch.nn.Module, seed: int = 1) -> None:
    """Move every parameter off its init, so Δθ ≠ 0 and conditions give different weights."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


# ---- the hypernetwork library ------------------------------------------------------------------------
@pytest.mark.parametrize("output", ["full", "lowrank", "chunked"])
def test_mip_is_identity_at_init(output: str) -> None:
    theta0 = _theta0()
    hn = HyperNet(SHAPES, CosSinEncoding(2), theta0, hidden=[16], output=output, chunk=7)
    out = hn(torch.rand(5, 2))
    for k, v in theta0.items():
        assert out[k].shape == (5, *v.shape)
        torch.testing.assert_close(out[k], v.expand_as(out[k]), rtol=0, atol=0)


def test_default_parametrization_depends_on_the_condition_at_init() -> None:
    hn = HyperNet(SHAPES, RawEncoding(2), None, hidden=[16], output="full", additive=False)
    out = hn(torch.tensor([[0.0, 0.0], [1.0, 0.5]]))
    assert not torch.allclose(out["conv.weight"][0], out["conv.weight"][1])
    assert hn.theta0 is None


def test_cos_sin_encoding_has_constant_norm() -> None:
    z = torch.rand(200, 3)
    z[0] = 0.0
    z[1] = 1.0
    norms = CosSinEncoding(3)(z).norm(dim=1)
    torch.testing.assert_close(norms, torch.full((200,), math.sqrt(3)))
    raw = RawEncoding(3)(z).norm(dim=1)
    assert raw.max() - raw.min() > 0.5  # the default encoding's magnitude varies with z


def test_gradients_reach_theta0_and_the_hypernetwork() -> None:
    hn = HyperNet(SHAPES, CosSinEncoding(1), _theta0(), hidden=[16, 16], output="chunked", chunk=32)
    opt = torch.optim.SGD(hn.parameters(), 0.1)
    for step in range(2):
        opt.zero_grad()
        out = hn(torch.rand(4, 1))
        sum((v**2).sum() for v in out.values()).backward()
        assert hn.theta0.grad is not None and hn.theta0.grad.abs().sum() > 0
        assert hn.head.weight.grad.abs().sum() > 0
        if step == 1:  # the output layer left zero after step 0, so the MLP now gets gradients too
            assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in hn.mlp.parameters())
        opt.step()


def test_chunked_and_lowrank_outputs_do_not_grow_as_hidden_times_weights() -> None:
    shapes = param_shapes(ArchSpec.preset("small").arch_kwargs, 1, 1, "scale")
    n_weights = sum(math.prod(s) for s in shapes.values())
    theta0 = he_init(shapes, 0)
    chunked = HyperNet(shapes, CosSinEncoding(1), theta0, hidden=[64, 64], output="chunked")
    lowrank = HyperNet(shapes, CosSinEncoding(1), theta0, hidden=[64, 64], output="lowrank", rank=4)
    assert chunked.n_hyper_params() < 64 * n_weights / 100
    assert lowrank.n_hyper_params() < 64 * n_weights / 10


def test_unknown_output_is_a_clear_error() -> None:
    with pytest.raises(ModelError, match="chunked"):
        HyperNet(SHAPES, RawEncoding(1), _theta0(), output="dense")
    with pytest.raises(ModelError, match="theta0"):
        HyperNet(SHAPES, RawEncoding(1), None, additive=True)


# ---- the functional U-Net ----------------------------------------------------------------------------
@pytest.mark.parametrize("preset", ["tiny", "micro"])
def test_plain_mode_is_nnunets_plainconvunet(preset: str) -> None:
    spec = ArchSpec.preset(preset, 2, 3)
    net = build_network(spec, seed=3).eval()
    state = real_state_dict(net)
    x = torch.randn(2, 2, 32, 64)
    with torch.no_grad():
        torch.testing.assert_close(unet_forward(state, x, spec.arch_kwargs), net(x), rtol=0, atol=0)


@pytest.mark.parametrize(("mode", "phi"), [("plain", 0.5), ("scale", 0.25), ("scale", 0.5), ("scale", 0.66)])
def test_flops_are_exact(mode: str, phi: float) -> None:
    kw = ArchSpec.preset("tiny").arch_kwargs
    params = he_init(param_shapes(kw, 1, 2, mode), 0)
    size = (64, 48) if mode == "plain" else (61, 47)
    with FlopCounterMode(display=False) as counter:
        unet_forward(params, torch.randn(1, 1, *size), kw, mode, phi)
    assert counter.get_total_flops() == unet_flops(kw, 1, 2, size, mode, phi)


def test_flops_grow_with_phi() -> None:
    kw = ArchSpec.preset("small").arch_kwargs
    flops = [unet_flops(kw, 1, 1, (64, 64), "scale", phi) for phi in (0.25, 0.4, 0.5, 0.6, 0.75)]
    assert flops == sorted(flops) and flops[-1] > 2 * flops[0]


def test_small_phi_keeps_levels_of_at_least_two_pixels() -> None:
    """small preset, 64 px, φ = 0.25: 64, 16, 4, then 2 (not 1: instance norm needs > 1 value)."""
    model = HyperUNet(ArchSpec.preset("small", 1, 1), HyperConfig(condition="scale"), seed=0).train()
    out = model(torch.randn(2, 1, 64, 64), 0.25)
    out.mean().backward()
    assert out.shape == (2, 1, 64, 64)


def test_hyper_demo_section(tiny_phantom_dataset, tmp_path: Path) -> None:
    from weightzoo.evaluate.report import Report
    from weightzoo.hyper.demo import demo_hyper

    rep = Report(tmp_path / "report", "demo")
    res = demo_hyper(tmp_path, tiny_phantom_dataset, "A", rep, log=lambda m: None, steps=4)
    assert len(res["rows"]) == 11 and all(0 <= r["hypernetwork Dice"] <= 1 for r in res["rows"])
    assert (tmp_path / "report/figures/hyper_front.png").exists()


def test_per_sample_weights_equal_per_condition_runs() -> None:
    spec = ArchSpec.preset("tiny", 1, 1)
    model = HyperUNet(spec, HyperConfig(condition="site", sites=["A", "B", "C"]), seed=0).eval()
    _perturb(model.hyper)
    x = torch.randn(6, 1, 32, 32)
    sites = torch.tensor([0, 1, 2, 3, 1, 2])
    with torch.no_grad():
        together = model(x, sites)
        alone = torch.cat([model(x[i : i + 1], int(sites[i])) for i in range(6)])
        assert not torch.allclose(model(x[:1], 1), model(x[:1], 2))  # conditions differ
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-5)


def test_scale_space_network_round_trip(tmp_path: Path) -> None:
    model = HyperUNet(ArchSpec.preset("tiny", 1, 1), HyperConfig(condition="scale"), seed=0).eval()
    _perturb(model.hyper)
    net = model.sample_network(0.6)
    spec = model.sample_spec(0.6)
    assert spec.network_class_name == SCALE_SPACE_UNET and spec.size_divisor == 1
    x = torch.randn(2, 1, 45, 37)  # any size: levels are resized, not strided
    with torch.no_grad():
        torch.testing.assert_close(net(x), model(x, 0.6))
    assert ArchSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ModelError, match="scale must be"):
        ArchSpec.from_dict({**spec.to_dict(), "arch_kwargs": {**spec.arch_kwargs, "scale": 2.0}})
    with pytest.raises(ModelError, match="unknown key"):  # a PlainConvUNet has no scale
        ArchSpec.from_dict({**ArchSpec.preset("tiny").to_dict(), "arch_kwargs": {**spec.arch_kwargs}})
    with pytest.raises(InputError, match="outside the trained range"):
        model.sample_network(0.9)


def test_hyper_config_rejects_unknown_keys_and_bad_values() -> None:
    with pytest.raises(InputError, match="unknown hyper config"):
        HyperConfig.from_dict({"condition": "scale", "colour": 1})
    with pytest.raises(InputError, match="unknown condition"):
        HyperConfig(condition="age")
    with pytest.raises(InputError, match="scale range"):
        HyperConfig(scale_range=(0.5, 0.4))


# ---- training, resuming, the folder ------------------------------------------------------------------
def _cfg(**kw) -> TrainConfig:
    base = dict(
        tasks=["cord"],
        preset="tiny",
        steps=12,
        batch_size=4,
        optimizer="adam",
        lr=1e-2,
        val_every=4,
        checkpoint_every=4,
        device="cpu",
    )
    return TrainConfig(**{**base, **kw})


@pytest.mark.parametrize("condition", ["scale", "site"])
def test_resume_after_kill_gives_the_same_weights(
    tiny_phantom_dataset, tmp_path: Path, condition: str
) -> None:
    hcfg = HyperConfig(condition=condition)
    whole, _ = train_hyper(tiny_phantom_dataset, _cfg(), hcfg, tmp_path / "whole")
    stopped, _ = train_hyper(tiny_phantom_dataset, _cfg(), hcfg, tmp_path / "killed", stop_after=6)
    assert stopped is None and (tmp_path / "killed/.runs/hyper").is_dir()
    resumed, trained = train_hyper(tiny_phantom_dataset, _cfg(), hcfg, tmp_path / "killed")
    assert trained and resumed is not None
    for (k, a), b in zip(whole.state_dict().items(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)
    _, trained = train_hyper(tiny_phantom_dataset, _cfg(), hcfg, tmp_path / "killed")
    assert not trained  # a finished run is not trained again
    with pytest.raises(ModelError, match="another run"):
        train_hyper(tiny_phantom_dataset, _cfg(seed=1), hcfg, tmp_path / "killed")


def _train_cli(dataset: Path, out: Path, *extra: str) -> None:
    argv = ["hyper", "train", "-d", str(dataset), "-t", "cord", "--preset", "tiny", "--steps", "8"]
    assert main([*argv, "--batch-size", "4", "--no-progress", "-o", str(out), *extra]) == 0


def test_site_hypernetwork_samples_plain_networks_that_export(
    tiny_phantom_dataset, tmp_path: Path, capsys
) -> None:
    _train_cli(tiny_phantom_dataset.root, tmp_path / "h", "--condition", "site")
    meta = json.loads((tmp_path / "h/hyper.json").read_text())
    assert meta["hyper"]["sites"] == ["A", "B"]
    assert (
        main(["hyper", "sample", "-m", str(tmp_path / "h"), "--site", "B", "-o", str(tmp_path / "netB")]) == 0
    )
    net_meta = json.loads((tmp_path / "netB/model.json").read_text())
    assert net_meta["route"] == "hyper" and net_meta["info"]["condition"] == {"site": "B"}
    assert main(["zoo", "export", str(tmp_path / "netB"), str(tmp_path / "nnunet")]) == 0
    assert (
        main(
            [
                "evaluate",
                "-m",
                str(tmp_path / "h"),
                "-d",
                str(tiny_phantom_dataset.root),
                "-o",
                str(tmp_path / "s.json"),
            ]
        )
        == 0
    )
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["used"] == {"A": "A", "B": "B"} and summary["n_cases"] == 2
    image = sorted((tiny_phantom_dataset.root / "imagesTr").glob("*.nii.gz"))[0]
    out = tmp_path / "o.nii.gz"
    assert main(["segment", "-i", str(image), "-m", str(tmp_path / "h"), "--site", "B", "-o", str(out)]) == 0
    capsys.readouterr()
    assert main(["segment", "-i", str(image), "-m", str(tmp_path / "h"), "--site", "Q", "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "hyper.json: site 'Q'" in err and "use one of A, B" in err and len(err.splitlines()) == 1


def test_scale_cli_train_front_sample_segment(tiny_phantom_dataset, tmp_path: Path, capsys) -> None:
    ds = str(tiny_phantom_dataset.root)
    h = str(tmp_path / "h")
    _train_cli(tiny_phantom_dataset.root, Path(h))
    assert main(["hyper", "front", "-m", h, "-d", ds, "--scales", "0.25,0.5,0.75"]) == 0
    rows = json.loads((tmp_path / "h/front_val/front.json").read_text())["rows"]
    assert [r["scale"] for r in rows] == [0.25, 0.5, 0.75]
    assert rows[0]["flops"] < rows[1]["flops"] < rows[2]["flops"]
    assert (tmp_path / "h/front_val/front.png").stat().st_size > 1000
    assert main(["hyper", "sample", "-m", h, "--scale", "0.6", "-o", str(tmp_path / "net")]) == 0
    image = sorted((tiny_phantom_dataset.root / "imagesTr").glob("*.nii.gz"))[0]
    a, b = tmp_path / "a.nii.gz", tmp_path / "b.nii.gz"
    assert main(["segment", "-i", str(image), "-m", h, "--scale", "0.6", "-o", str(a)]) == 0
    assert main(["segment", "-i", str(image), "-m", str(tmp_path / "net"), "-o", str(b)]) == 0
    import nibabel as nib

    ia, ib, src = nib.load(a), nib.load(b), nib.load(image)
    assert np.array_equal(ia.get_fdata(), ib.get_fdata()) and ia.shape == src.shape
    assert np.allclose(ia.affine, src.affine)
    assert main(["evaluate", "-m", str(tmp_path / "net"), "-d", ds, "-o", str(tmp_path / "e.json")]) == 0
    assert main(["evaluate", "-m", h, "--scale", "0.5", "-d", ds, "-o", str(tmp_path / "e2.json")]) == 0
    capsys.readouterr()
    # errors: one line, exit 2, naming the fix
    for args, words in [
        (["segment", "-i", str(image), "-m", h, "-o", str(a)], "needs --scale"),
        (
            ["segment", "-i", str(image), "-m", h, "--scale", "0.95", "-o", str(a)],
            "hyper.json: scale 0.95 is outside",
        ),
        (["segment", "-i", str(image), "-m", h, "--scale", "0.5", "--site", "A", "-o", str(a)], "not --site"),
        (
            ["segment", "-i", str(image), "-m", str(tmp_path / "net"), "--scale", "0.5", "-o", str(a)],
            "hyper.json",
        ),
        (["zoo", "export", str(tmp_path / "net"), str(tmp_path / "x")], "PlainConvUNet"),
        (
            ["hyper", "train", "-d", ds, "-t", "cord", "--scale-range", "0.1", "-o", str(tmp_path / "q")],
            "two numbers",
        ),
        (
            ["hyper", "train", "-d", ds, "-t", "cord", "--output", "dense", "-o", str(tmp_path / "q")],
            "chunked",
        ),
    ]:
        assert main(args) == 2, args
        err = capsys.readouterr().err.strip()
        assert words in err and len(err.splitlines()) == 1, err


def test_broken_hyper_folder_is_a_one_line_error(tiny_phantom_dataset, tmp_path: Path, capsys) -> None:
    model = HyperUNet(ArchSpec.preset("tiny"), HyperConfig(), seed=0)
    from weightzoo.data.slices import Preprocessing
    from weightzoo.hyper.model import save_hyper

    folder = save_hyper(tmp_path / "h", model, ["cord"], Preprocessing("zscore", (64, 64), 2, 1), 1.0)
    load_hyper(folder)
    (folder / "hyper.safetensors").write_bytes(b"not a tensor file")
    image = sorted((tiny_phantom_dataset.root / "imagesTr").glob("*.nii.gz"))[0]
    assert (
        main(
            [
                "segment",
                "-i",
                str(image),
                "-m",
                str(folder),
                "--scale",
                "0.5",
                "-o",
                str(tmp_path / "o.nii.gz"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert "hyper.safetensors" in err and len(err.splitlines()) == 1
