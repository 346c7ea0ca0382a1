"""Training site heads: (a) backbone + universal head on all sites, (b) one head per site with the
backbone frozen, (c) optionally a short joint unfreeze at a low learning rate; and few-shot heads for
new sites (`add_site`). Resumable. The machinery (MultiHeadNet, site-balanced sampling, one resumable
phase on the nnU-Net recipe of `weightzoo.train`) is in `weightzoo.heads.phase`.

3-D configs (`cfg.dims == 3`, presets tiny3d/small3d/default3d): the phases train on patches of
preprocessed volumes (`weightzoo.volume`, loaded as `weightzoo train --dims 3` loads them), and the
heads model stores the 3-D pipeline, so its heads segment NIfTI volumes with nnU-Net's sliding window.

Heads folder (see weightzoo.heads.model) plus `.runs/<phase>/` checkpoints while a phase runs.
heads.json `info.phases_done` lists finished phases; re-running the same command skips them.
"""

from __future__ import annotations

import dataclasses
import json
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from weightzoo.data.raw import RawDataset
from weightzoo.data.slices import Preprocessing, load_slices
from weightzoo.errors import InputError, ModelError
from weightzoo.heads.model import (
    HEADS_DIR,
    HEADS_JSON,
    UNIVERSAL,
    HeadedModel,
    State,
    check_site_name,
    head_names,
    head_prefixes,
    is_heads_folder,
    n_elements,
    read_heads_json,
)
from weightzoo.heads.phase import (
    Data,
    MultiHeadNet,
    PhaseResult,
    run_phase,
    site_balanced_batch,
    site_pools,
    site_subset,
    val_dice,
)
from weightzoo.nets.unet import ArchSpec, build_network, real_state_dict
from weightzoo.train.config import TrainConfig
from weightzoo.train.distributed import barrier, is_writer
from weightzoo.train.loop import patch_size, slices_hash
from weightzoo.volume.patches import VolumeSet

RUNS_DIR = ".runs"


# ---- building blocks used by the CLI and the benchmark ----------------------------------------------
def spec_for(cfg: TrainConfig, channels: int, spacing: tuple[float, float, float] | None = None) -> ArchSpec:
    """The network of a run; 3-D presets are planned for patch_size(cfg) and `spacing` [z, y, x]
    (the volumes' target spacing: a VolumeSet's `spacing`, its pipeline's)."""
    if cfg.dims == 3:
        return ArchSpec.preset(cfg.preset, channels, len(cfg.tasks), cfg.dropout, patch_size(cfg), spacing)
    return ArchSpec.preset(
        cfg.preset, input_channels=channels, num_classes=len(cfg.tasks), dropout=cfg.dropout
    )


def _check_dims(train: Data, cfg: TrainConfig) -> None:
    volumes = isinstance(train, VolumeSet)
    if volumes != (cfg.dims == 3):
        raise InputError(
            f"{'3-D volumes' if volumes else '2-D slices'} were given with the {cfg.dims}-D preset '{cfg.preset}'",
            "train 3-D presets (tiny3d, small3d, default3d) on volumes and 2-D presets on slices",
        )


def _data_hash(train: Data) -> str:
    return train.data_hash() if isinstance(train, VolumeSet) else slices_hash(train)


def train_backbone(
    train: Data,
    val: Data | None,
    cfg: TrainConfig,
    head_stages: int,
    run_dir: Path | None = None,
    identity: dict[str, Any] | None = None,
    progress: bool = False,
    stop_after: int | None = None,
) -> tuple[HeadedModel | None, PhaseResult]:
    """(a) The whole network on all sites of `train`, site-balanced; its head becomes the universal head.

    The backbone does not depend on `head_stages` (it only decides where the network is cut), so one
    trained network serves every n via `HeadedModel.from_network`. Returns (None, result) if stopped.
    `train`/`val`: SliceSets, or VolumeSets for a 3-D config (patches of patch_size(cfg)).
    """
    _check_dims(train, cfg)
    if isinstance(train, VolumeSet):
        spec = spec_for(cfg, train.n_channels, train.spacing)
    else:
        spec = spec_for(cfg, train.images.shape[1])
    head_prefixes(spec, head_stages)  # range check before any work
    net = build_network(spec, seed=cfg.seed)
    names = head_names(spec, head_stages)
    full = real_state_dict(net)
    model = MultiHeadNet(net, {UNIVERSAL: {k: full[k] for k in names}})
    model.set_trainable(backbone=True, heads=[UNIVERSAL])
    pools = site_pools(train)

    def sampler(g: torch.Generator) -> tuple[Any, str]:
        return site_balanced_batch(g, pools, cfg.batch_size, cfg.foreground_oversample), UNIVERSAL

    res = run_phase(
        model,
        train,
        sampler,
        cfg,
        "backbone",
        (UNIVERSAL, val) if val is not None else None,
        run_dir,
        identity,
        progress,
        stop_after,
    )
    if not res.finished:
        return None, res
    hm = HeadedModel(
        spec,
        list(cfg.tasks),
        train.preprocessing,
        head_stages,
        model.backbone_state(),
        {UNIVERSAL: model.head_state(UNIVERSAL)},
    )
    by_site = (
        {s: val_dice(model, UNIVERSAL, site_subset(val, s), cfg.tasks, cfg.device) for s in val.sites()}
        if val
        else {}
    )
    hm.head_info[UNIVERSAL] = {
        "route": "all sites",
        "sites": pools.sites,
        **({"n_train_cases": len(train)} if isinstance(train, VolumeSet) else {"n_train_slices": len(train)}),
        "steps": cfg.steps,
        "seconds": round(res.seconds, 3),
        "val_dice": val_dice(model, UNIVERSAL, val, cfg.tasks, cfg.device),
        "val_dice_by_site": by_site,
    }
    return hm, res


def train_site_head(
    hm: HeadedModel,
    train: Data,
    val: Data | None,
    cfg: TrainConfig,
    name: str,
    route: str = "frozen backbone",
    run_dir: Path | None = None,
    identity: dict[str, Any] | None = None,
    progress: bool = False,
    stop_after: int | None = None,
) -> tuple[State | None, dict[str, Any], PhaseResult]:
    """(b) One head on `train` (one site's slices, or volumes for a 3-D model) with the backbone
    frozen, starting from the universal head; cfg.steps steps at cfg.learning_rate. Returns (head
    state, head info, result); the state is None if stopped early. `hm` is not changed: add the head
    with `hm.set_head`. Volumes carry no subjects: their info lists `cases` (callers add `subjects`)."""
    _check_dims(train, cfg)
    net = hm.network(UNIVERSAL)
    model = MultiHeadNet(net, {name: hm.heads[UNIVERSAL]})
    model.set_trainable(backbone=False, heads=[name])
    pools = site_pools(train)

    def sampler(g: torch.Generator) -> tuple[Any, str]:
        return site_balanced_batch(g, pools, cfg.batch_size, cfg.foreground_oversample), name

    res = run_phase(
        model,
        train,
        sampler,
        cfg,
        f"head-{name}",
        (name, val) if val is not None else None,
        run_dir,
        identity,
        progress,
        stop_after,
    )
    if not res.finished:
        return None, {}, res
    universal = MultiHeadNet(hm.network(UNIVERSAL), {UNIVERSAL: hm.heads[UNIVERSAL]})
    data: dict[str, Any] = (
        {"cases": sorted(train.cases), "n_train_cases": len(train)}
        if isinstance(train, VolumeSet)
        else {"subjects": sorted({m["subject"] for m in train.meta}), "n_train_slices": len(train)}
    )
    info = {
        "route": route,
        **data,
        "steps": cfg.steps,
        "lr": cfg.learning_rate,
        "seconds": round(res.seconds, 3),
        "val_dice": val_dice(model, name, val, cfg.tasks, cfg.device),
        "val_dice_universal": val_dice(universal, UNIVERSAL, val, cfg.tasks, cfg.device),
    }
    return model.head_state(name), info, res


def joint_unfreeze(
    hm: HeadedModel,
    train: Data,
    val: Data | None,
    cfg: TrainConfig,
    run_dir: Path | None = None,
    identity: dict[str, Any] | None = None,
    progress: bool = False,
    stop_after: int | None = None,
) -> tuple[HeadedModel | None, PhaseResult]:
    """(c) Backbone and all heads together at cfg.learning_rate (low): each step trains one head,
    drawn uniformly among the universal head (site-balanced batch) and the site heads (that site's
    slices). The backbone stays shared, so every head is re-saved with the new backbone."""
    names = [UNIVERSAL, *hm.sites()]
    model = MultiHeadNet(hm.network(UNIVERSAL), {n: hm.heads[n] for n in names})
    model.set_trainable(backbone=True, heads=names)
    pools = site_pools(train)
    own = {s: site_pools(train, [s]) for s in hm.sites() if s in pools.sites}
    heads = [UNIVERSAL, *own]

    def sampler(g: torch.Generator) -> tuple[Any, str]:
        head = heads[int(torch.randint(len(heads), (1,), generator=g))]
        p = pools if head == UNIVERSAL else own[head]
        return site_balanced_batch(g, p, cfg.batch_size, cfg.foreground_oversample), head

    res = run_phase(
        model,
        train,
        sampler,
        cfg,
        "joint",
        (UNIVERSAL, val) if val is not None else None,
        run_dir,
        identity,
        progress,
        stop_after,
    )
    if not res.finished:
        return None, res
    out = dataclasses.replace(hm, backbone=model.backbone_state(), heads={}, head_info={})
    for n in names:
        site_val = (
            val if n == UNIVERSAL or val is None else (site_subset(val, n) if n in val.sites() else None)
        )
        info = dict(hm.head_info.get(n, {}))
        info.update(
            route=info.get("route", "") + " + joint unfreeze",
            joint_steps=cfg.steps,
            joint_seconds=round(res.seconds, 3),
            val_dice=val_dice(model, n, site_val, cfg.tasks, cfg.device),
        )
        out.set_head(n, model.head_state(n), info)
    return out, res


# ---- the folder-level commands ----------------------------------------------------------------------
@dataclass
class HeadsResult:
    model: HeadedModel | None  # None when stopped early (stop_after)
    folder: Path
    finished: bool
    phases_run: list[str]
    seconds: float


def _run_dir(folder: Path, phase: str) -> Path:
    return folder / RUNS_DIR / phase


def _clear(folder: Path) -> None:
    for name in (HEADS_JSON, "backbone.safetensors", "model.json", "model.safetensors"):
        (folder / name).unlink(missing_ok=True)
    for d in (HEADS_DIR, RUNS_DIR):
        shutil.rmtree(folder / d, ignore_errors=True)


def train_heads(
    ds: RawDataset | str | Path,
    cfg: TrainConfig,
    out_dir: str | Path,
    head_stages: int = 1,
    sites: list[str] | None = None,
    head_steps: int | None = None,
    head_lr: float | None = None,
    unfreeze_steps: int = 0,
    unfreeze_lr_factor: float = 0.1,
    resume: bool = True,
    force: bool = False,
    progress: bool = False,
    stop_after: int | None = None,
    log: Callable[[str], None] = lambda s: None,
) -> HeadsResult:
    """`weightzoo heads train`: (a) backbone + universal head on the train split of `sites` (default
    all), (b) a head per site (backbone frozen; head_steps default cfg.steps // 10, lr default
    cfg's), (c) `unfreeze_steps` > 0: joint unfreeze at lr · unfreeze_lr_factor. Validation: val split.
    A 3-D config (cfg.dims == 3) trains on volumes, preprocessed as `weightzoo train --dims 3` does.

    Re-running the same call skips finished phases and resumes an interrupted one. `stop_after`
    stops the call (as if killed) once it has run that many steps, over all phases (tests).
    """
    t0 = time.perf_counter()
    ds = ds if isinstance(ds, RawDataset) else RawDataset.open(ds)
    out = Path(out_dir)
    for t in cfg.tasks:
        ds.task_labels(t)
    sites = [ds.check_site(s) for s in sites] if sites else ds.sites()
    for s in sites:
        check_site_name(s)
    head_prefixes(spec_for(cfg, ds.n_channels), head_stages)
    head_steps = head_steps if head_steps is not None else max(1, cfg.steps // 10)
    if head_steps < 1 or unfreeze_steps < 0 or not 0 < unfreeze_lr_factor <= 1:
        raise InputError(
            "head steps must be >= 1, unfreeze steps >= 0 and the unfreeze lr factor in (0, 1]",
            "fix --head-steps / --unfreeze-steps / --unfreeze-lr-factor",
        )
    prep = Preprocessing(cfg.normalization, tuple(cfg.size), cfg.axis, ds.n_channels)
    train_cases, val_cases = ds.cases_in("train", sites), ds.cases_in("val", sites)
    if not train_cases:
        raise InputError(f"no training cases for sites {sites}", "check the dataset's splits", ds.root)
    train: Data
    val: Data | None
    if cfg.dims == 3:
        from weightzoo.volume.data import load_volumes, volume_preprocessing

        prep = volume_preprocessing(ds, cfg, train_cases)
        train = load_volumes(ds, cfg.tasks, train_cases, prep)
        val = load_volumes(ds, cfg.tasks, val_cases, prep) if val_cases else None
    else:
        train = load_slices(ds, cfg.tasks, prep=prep, cases=train_cases)
        val = load_slices(ds, cfg.tasks, prep=prep, cases=val_cases) if val_cases else None
    head_cfg = dataclasses.replace(cfg, steps=head_steps, lr=head_lr if head_lr is not None else cfg.lr)
    identity = json.loads(
        json.dumps(
            {
                "config": cfg.identity(),
                "head_stages": head_stages,
                "head": head_cfg.identity(),
                "unfreeze_steps": unfreeze_steps,
                "unfreeze_lr_factor": unfreeze_lr_factor,
                "sites": sites,
                "data_hash": _data_hash(train),
            }
        )
    )
    if force and is_writer():  # under torchrun, rank 0 alone writes; the others wait at each barrier
        _clear(out)
    barrier()
    done: list[str] = []
    if is_heads_folder(out):
        meta = read_heads_json(out)
        if meta.get("info", {}).get("run") != identity:
            raise ModelError(
                "the folder holds a heads model of another run (other data, sites or options)",
                "use another --out, or --force to overwrite it",
                out,
            )
        done = list(meta["info"].get("phases_done", []))
    elif (out / "model.json").exists():
        raise ModelError(
            "the folder holds a plain model", "use another --out, or --force to overwrite it", out
        )
    if not resume and is_writer():
        shutil.rmtree(out / RUNS_DIR, ignore_errors=True)
    barrier()
    phases: list[str] = []
    left = stop_after  # steps this call may still run (tests: "killed" after that many)

    def stopped() -> HeadsResult:
        return HeadsResult(None, out, False, phases, time.perf_counter() - t0)

    if "backbone" not in done:
        phases.append("backbone")
        log(f"(a) backbone + universal head on sites {', '.join(sites)}: {cfg.steps} steps")
        hm, res = train_backbone(
            train, val, cfg, head_stages, _run_dir(out, "backbone"), identity, progress, left
        )
        if hm is None:
            return stopped()
        left = None if left is None else left - res.steps_run
        hm.info = {
            "run": identity,
            "phases_done": ["backbone"],
            "config": cfg.to_dict(),
            "head_steps": head_steps,
            "head_lr": head_cfg.learning_rate,
            "dataset": ds.name,
            "dataset_path": str(ds.root),
            "channel_names": dict(ds.meta["channel_names"]),
            "task_labels": {t: ds.task_labels(t) for t in cfg.tasks},
            "file_ending": ds.file_ending,
            "sites": sites,
            "split": {
                "train": sorted({ds.subject(c) for c in train_cases}),
                "val": sorted({ds.subject(c) for c in val_cases}),
            },
        }
        hm.info.update(res.info)  # the distributed summary, under torchrun
        if is_writer():
            hm.save(out)
            shutil.rmtree(_run_dir(out, "backbone"), ignore_errors=True)
        barrier()
        done = ["backbone"]
    hm = HeadedModel.load(out)
    for site in sites:
        phase = f"head-{site}"
        if phase in done:
            continue
        if left is not None and left <= 0:
            return stopped()
        phases.append(phase)
        log(f"(b) head for site {site} (backbone frozen): {head_steps} steps")
        site_val = site_subset(val, site) if val is not None and site in val.sites() else None
        bb = {**identity, "backbone_hash": hm.backbone_hash}
        site_train = site_subset(train, site)
        state, info, res = train_site_head(
            hm,
            site_train,
            site_val,
            head_cfg,
            site,
            "frozen backbone",
            _run_dir(out, phase),
            bb,
            progress,
            left,
        )
        if state is None:
            return stopped()
        left = None if left is None else left - res.steps_run
        if isinstance(site_train, VolumeSet):
            info["subjects"] = sorted({ds.subject(c) for c in site_train.cases})
        hm.set_head(site, state, info)
        hm.info["phases_done"] = done = [*done, phase]
        if is_writer():
            hm.save_head(out, site)
            shutil.rmtree(_run_dir(out, phase), ignore_errors=True)
        barrier()
    if unfreeze_steps and "joint" not in done:
        if left is not None and left <= 0:
            return stopped()
        phases.append("joint")
        lr = cfg.learning_rate * unfreeze_lr_factor
        log(f"(c) joint unfreeze of backbone and heads: {unfreeze_steps} steps at lr {lr:g}")
        joint_cfg = dataclasses.replace(cfg, steps=unfreeze_steps, lr=lr)
        bb = {**identity, "backbone_hash": hm.backbone_hash}
        new, _ = joint_unfreeze(hm, train, val, joint_cfg, _run_dir(out, "joint"), bb, progress, left)
        if new is None:
            return stopped()
        new.info["phases_done"] = [*done, "joint"]
        if is_writer():
            new.save(out)
            shutil.rmtree(_run_dir(out, "joint"), ignore_errors=True)
        barrier()
        hm = new
    if is_writer():
        shutil.rmtree(out / RUNS_DIR, ignore_errors=True)
    barrier()
    return HeadsResult(HeadedModel.load(out), out, True, phases, time.perf_counter() - t0)


def pick_subjects(ds: RawDataset, site: str, shots: int | None, seed: int = 0) -> list[str]:
    """`shots` training subjects of `site` (all if None), drawn with `seed`; nested as shots grows."""
    subjects = sorted({ds.subject(c) for c in ds.cases_in("train", [site])})
    if not subjects:
        raise InputError(f"site '{site}' has no training subjects", "check the dataset's splits", ds.root)
    if shots is None:
        return subjects
    if not 1 <= shots <= len(subjects):
        raise InputError(
            f"--shots {shots}, but site '{site}' has {len(subjects)} training subject(s)",
            f"give --shots between 1 and {len(subjects)}",
            ds.root,
        )
    random.Random(seed).shuffle(subjects)
    return sorted(subjects[:shots])


def add_site(
    model_dir: str | Path,
    ds: RawDataset | str | Path,
    site: str,
    shots: int | None = None,
    steps: int | None = None,
    lr: float | None = None,
    seed: int = 0,
    head_name: str | None = None,
    resume: bool = True,
    force: bool = False,
    progress: bool = False,
    stop_after: int | None = None,
) -> HeadsResult:
    """`weightzoo heads add-site`: a head for `site` of `ds` from `shots` labelled training subjects
    (all if None), backbone frozen. Writes heads/<site>.safetensors and heads.json only.

    steps/lr default to the model's head settings; validation on the site's val split (if any).
    """
    t0 = time.perf_counter()
    model_dir = Path(model_dir)
    hm = HeadedModel.load(model_dir)
    ds = ds if isinstance(ds, RawDataset) else RawDataset.open(ds)
    ds.check_site(site)
    name = check_site_name(head_name or site)
    if name in hm.heads and not force:
        raise ModelError(
            f"the model already has a head for site '{name}'",
            "use --force to replace it",
            model_dir / HEADS_JSON,
        )
    for t in hm.tasks:
        ds.task_labels(t)
    if ds.n_channels != hm.preprocessing.channels:
        raise InputError(
            f"dataset has {ds.n_channels} channel(s), the model expects {hm.preprocessing.channels}",
            "add a site of the same modality",
            ds.root,
        )
    subjects = pick_subjects(ds, site, shots, seed)
    cases = [c for c in ds.cases_in("train", [site]) if ds.subject(c) in set(subjects)]
    val_cases = ds.cases_in("val", [site])
    train: Data
    val: Data | None
    if hm.preprocessing.dims == 3:  # the model's own pipeline: the new site is resampled to its spacing
        from weightzoo.volume.data import load_volumes

        train = load_volumes(ds, hm.tasks, cases, hm.preprocessing)
        val = load_volumes(ds, hm.tasks, val_cases, hm.preprocessing) if val_cases else None
    else:
        train = load_slices(ds, hm.tasks, prep=hm.preprocessing, cases=cases)
        val = load_slices(ds, hm.tasks, prep=hm.preprocessing, cases=val_cases) if val_cases else None
    base = TrainConfig.from_dict(hm.info["config"]) if "config" in hm.info else TrainConfig(tasks=hm.tasks)
    cfg = dataclasses.replace(
        base,
        steps=steps if steps is not None else int(hm.info.get("head_steps", max(1, base.steps // 10))),
        lr=lr if lr is not None else hm.info.get("head_lr", base.lr),
        seed=seed,
    )
    identity = {
        "site": site,
        "subjects": subjects,
        "config": cfg.identity(),
        "backbone_hash": hm.backbone_hash,
        "data_hash": _data_hash(train),
    }
    run_dir = _run_dir(model_dir, f"add-{name}")
    if not resume:
        shutil.rmtree(run_dir, ignore_errors=True)
    route = f"few-shot ({len(subjects)} subjects)" if shots is not None else "frozen backbone"
    state, info, _ = train_site_head(
        hm, train, val, cfg, name, route, run_dir, identity, progress, stop_after
    )
    if state is None:
        return HeadsResult(None, model_dir, False, [f"add-{name}"], time.perf_counter() - t0)
    if isinstance(train, VolumeSet):
        info["subjects"] = subjects
    info.update(dataset=ds.name, dataset_site=site, shots=shots)
    hm.set_head(name, state, info)
    hm.save_head(model_dir, name)
    shutil.rmtree(run_dir, ignore_errors=True)
    if (model_dir / RUNS_DIR).is_dir() and not any((model_dir / RUNS_DIR).iterdir()):
        (model_dir / RUNS_DIR).rmdir()
    return HeadsResult(
        HeadedModel.load(model_dir), model_dir, True, [f"add-{name}"], time.perf_counter() - t0
    )


def head_sizes(hm: HeadedModel) -> dict[str, int]:
    """Parameters per head, plus the backbone's."""
    return {"backbone": n_elements(hm.backbone), **{n: hm.head_n_params(n) for n in sorted(hm.heads)}}
