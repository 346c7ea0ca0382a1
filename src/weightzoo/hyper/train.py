"""Training a hypernetwork (one run for every φ, or every site) and the fixed-φ networks it is measured
against. Both use the recipe of `weightzoo.train` through `weightzoo.heads.phase.run_phase`
(TrainConfig, DiceBCELoss, nnU-Net augmentation, seeded per-step streams, poly lr, checkpoints), so a
killed run resumes to the same weights.

Scale condition: each step draws one φ ~ U[lo, hi] for its batch; validation averages φ = lo, mid, hi.
Site condition: site-balanced batches; each sample is shown as the unknown site (code 0) with
probability `site_dropout`, so the unknown-site weights are trained too; validation averages the sites.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from weightzoo.data.raw import RawDataset
from weightzoo.data.slices import Preprocessing, SliceSet, load_slices
from weightzoo.errors import InputError, ModelError
from weightzoo.heads.phase import PhaseResult, SitePools, run_phase, site_balanced_indices
from weightzoo.heads.train import spec_for
from weightzoo.hyper.model import (
    UNKNOWN_SITE,
    HyperConfig,
    HyperUNet,
    is_hyper_folder,
    load_hyper,
    read_hyper_json,
    save_hyper,
    scale_space_spec,
)
from weightzoo.nets.functional_unet import check_functional
from weightzoo.nets.unet import ArchSpec, build_network
from weightzoo.train.config import TrainConfig
from weightzoo.train.distributed import barrier, is_writer
from weightzoo.train.loop import history_to_json, slices_hash

RUN_DIR = ".runs/hyper"


def train_hyper_on_slices(
    train: SliceSet,
    val: SliceSet | None,
    cfg: TrainConfig,
    hcfg: HyperConfig,
    run_dir: Path | None = None,
    identity: dict[str, Any] | None = None,
    progress: bool = False,
    stop_after: int | None = None,
    step_losses: list[float] | None = None,
) -> tuple[HyperUNet, PhaseResult]:
    """Train a HyperUNet on `train` for cfg.steps steps; validated every cfg.val_every steps
    (`step_losses`: see run_phase)."""
    spec = spec_for(cfg, train.images.shape[1])
    model = HyperUNet(spec, hcfg, seed=cfg.seed)
    if hcfg.condition == "scale":
        pools = SitePools.of(train)
        lo, hi = hcfg.scale_range

        def sampler(g: torch.Generator) -> tuple[torch.Tensor, float]:
            idx = site_balanced_indices(g, pools, cfg.batch_size, cfg.foreground_oversample)
            return idx, lo + (hi - lo) * float(torch.rand((), generator=g))

        vals = [(phi, val) for phi in (lo, (lo + hi) / 2, hi)] if val is not None and len(val) else None
    else:
        pools = SitePools.of(train, hcfg.sites)
        site_id = torch.tensor([model.site_index(m["site"]) for m in train.meta])

        def sampler(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
            idx = site_balanced_indices(g, pools, cfg.batch_size, cfg.foreground_oversample)
            keep = torch.rand(len(idx), generator=g) >= hcfg.site_dropout
            return idx, torch.where(keep, site_id[idx], UNKNOWN_SITE)

        vals = (
            [(model.site_index(s), val.where(site=s)) for s in hcfg.sites if s in val.sites()]
            if val is not None
            else None
        )
    res = run_phase(
        model,
        train,
        sampler,
        cfg,
        "hyper",
        vals or None,
        run_dir,
        identity,
        progress,
        stop_after,
        step_losses,
    )
    return model, res


class _IgnoreCond(nn.Module):
    """net(x) called as model(x, cond), for run_phase."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor, cond: Any) -> torch.Tensor:
        return self.net(x)


def train_fixed_scale(
    train: SliceSet, val: SliceSet | None, cfg: TrainConfig, phi: float, progress: bool = False
) -> tuple[nn.Module, ArchSpec, PhaseResult]:
    """The baseline: one ScaleSpaceUNet at a fixed φ, same recipe and steps as the hypernetwork."""
    spec = scale_space_spec(spec_for(cfg, train.images.shape[1]), phi)
    net = build_network(spec, seed=cfg.seed)
    pools = SitePools.of(train)

    def sampler(g: torch.Generator) -> tuple[torch.Tensor, None]:
        return site_balanced_indices(g, pools, cfg.batch_size, cfg.foreground_oversample), None

    val_pair = (None, val) if val is not None and len(val) else None
    res = run_phase(_IgnoreCond(net), train, sampler, cfg, f"fixed-{phi:g}", val_pair, None, None, progress)
    return net.eval(), spec, res


def train_hyper(
    ds: RawDataset | str | Path,
    cfg: TrainConfig,
    hcfg: HyperConfig,
    out_dir: str | Path,
    sites: list[str] | None = None,
    resume: bool = True,
    force: bool = False,
    progress: bool = False,
    stop_after: int | None = None,
    log: Callable[[str], None] = lambda s: None,
) -> tuple[HyperUNet | None, bool]:
    """`weightzoo hyper train`: a hypernetwork on the train split (val split validates), written to
    `out_dir`. Returns (model, trained now); model is None when stopped by `stop_after` (tests).

    The same call again resumes an interrupted run, or does nothing for a finished one.
    """
    ds = ds if isinstance(ds, RawDataset) else RawDataset.open(ds)
    if cfg.dims != 2:
        raise InputError(
            f"hypernetworks are 2-D; preset {cfg.preset} is 3-D", "use a 2-D preset (tiny, small, default)"
        )
    out = Path(out_dir)
    for t in cfg.tasks:
        ds.task_labels(t)
    sites = [ds.check_site(s) for s in sites] if sites else ds.sites()
    if hcfg.condition == "site":
        hcfg = HyperConfig.from_dict({**hcfg.to_dict(), "sites": sites})
    check_functional(spec_for(cfg, ds.n_channels).arch_kwargs)
    prep = Preprocessing(cfg.normalization, tuple(cfg.size), cfg.axis, ds.n_channels)
    train_cases, val_cases = ds.cases_in("train", sites), ds.cases_in("val", sites)
    if not train_cases:
        raise InputError(f"no training cases for sites {sites}", "check the dataset's splits", ds.root)
    train = load_slices(ds, cfg.tasks, prep=prep, cases=train_cases)
    val = load_slices(ds, cfg.tasks, prep=prep, cases=val_cases) if val_cases else None
    identity = json.loads(
        json.dumps(
            {
                "config": cfg.identity(),
                "hyper": hcfg.to_dict(),
                "sites": sites,
                "data_hash": slices_hash(train),
            }
        )
    )
    if force and is_writer():
        shutil.rmtree(out / RUN_DIR, ignore_errors=True)
        for f in ("hyper.json", "hyper.safetensors"):
            (out / f).unlink(missing_ok=True)
    barrier()
    if is_hyper_folder(out):
        if read_hyper_json(out).get("info", {}).get("run") != identity:
            raise ModelError(
                "the folder holds a hypernetwork of another run (other data or options)",
                "use another --out, or --force to overwrite it",
                out,
            )
        return load_hyper(out)[0], False
    if (out / "model.json").exists() or (out / "heads.json").exists():
        raise ModelError("the folder holds another kind of model", "use another --out, or --force", out)
    run_dir = out / RUN_DIR
    if is_writer():  # under torchrun, rank 0 alone writes
        if not resume:
            shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(parents=True, exist_ok=True)
    barrier()
    log(
        f"hypernetwork ({hcfg.condition}, {'MIP' if hcfg.mip else 'default'} parametrization): {cfg.steps} steps"
    )
    model, res = train_hyper_on_slices(train, val, cfg, hcfg, run_dir, identity, progress, stop_after)
    if not res.finished:
        return None, True
    info = {
        **res.info,
        "run": identity,
        "config": cfg.to_dict(),
        "history": history_to_json(res.history),
        "train_seconds": round(res.seconds, 3),
        "dataset": ds.name,
        "dataset_path": str(ds.root),
        "task_labels": {t: ds.task_labels(t) for t in cfg.tasks},
        "sites": sites,
        "split": {
            "train": sorted({ds.subject(c) for c in train_cases}),
            "val": sorted({ds.subject(c) for c in val_cases}),
        },
    }
    if is_writer():
        save_hyper(out, model.cpu(), cfg.tasks, prep, res.seconds, info)
        shutil.rmtree(out / ".runs", ignore_errors=True)
    barrier()
    return model, True
