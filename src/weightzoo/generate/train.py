"""Train a parameter-diffusion generator on a checkpoint zoo; the `gen/` folder it writes.

Data: pairs (θ_i, θ_j), j > i (later step), of ONE run, from the zoo's TRAINING runs only (the run
split stored in the manifest); the val runs give a held-out loss in the log, test runs are never read.
Every checkpoint of every single- and multi-task run of one body (architecture up to its output count)
is embedded in the generator's task layout (weightzoo.generate.vectors). θ_i is standardised with the
zoo's per-tensor statistics (`Zoo.norm_stats` of the training runs); the diffusion variable is the
update θ_j − θ_i divided per tensor by the RMS of the updates of the training pairs (see
weightzoo.generate.diffusion). Conditioning of a pair: the val Dice per task of θ_i (current) and of
θ_j (target), the run's sites.

Each step: a batch of pairs drawn uniformly; with probability `permute` a pair is permuted by one
random channel permutation (the SAME for θ_i and θ_j, so the pair stays a pair); with probability
`site_dropout` its site is replaced by "any site"; a diffusion time t, noise ε; the loss is the mean
squared error of the predicted (scaled) update over the elements the run has (absent task rows are
skipped); 1.0 is the loss of predicting no update.
AdamW with warm-up and cosine decay, gradient clipping, EMA of the weights (used for sampling).

Resumable: every random draw of step s comes from a generator seeded by (seed, s); a checkpoint
(one atomic safetensors file: weights, EMA, optimizer state, step, log) is written every
`checkpoint_every` steps, so a killed run continues where it stopped with the same result.

gen/ folder:
  generator.json          format, configs, task/site vocabulary, body ArchSpec, preprocessing,
                          normalisation statistics, per-tensor RMS range and metric ranges of the
                          training zoo, the training runs' ids, seconds, finished
  generator.safetensors   the EMA weights (what `generate sample` uses)
  log.json                loss per logged step (train pairs; val-run pairs)
  checkpoint.safetensors  resumable state while training (removed when finished)
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes

from weightzoo.errors import InputError, ModelError, UnknownNameError
from weightzoo.fileio import atomic_write_bytes, atomic_write_json, read_folder_description, read_json
from weightzoo.generate.diffusion import EMA, DiffusionConfig, ParamDiffusion, cosine_alpha_bar, q_sample
from weightzoo.generate.vectors import TaskLayout, base_key
from weightzoo.nets.unet import ArchSpec
from weightzoo.segmenter import resolve_device
from weightzoo.train.distributed import DataParallel
from weightzoo.zoo.params import ParamLayout
from weightzoo.zoo.store import Zoo

GEN_JSON = "generator.json"
GEN_WEIGHTS = "generator.safetensors"
GEN_LOG = "log.json"
GEN_CKPT = "checkpoint.safetensors"
GEN_FORMAT = "weightzoo-generator"
METRIC = "val_dice"

# training recipe per generator preset (the model sizes are diffusion.PRESETS)
TRAIN_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"steps": 1500, "batch_size": 32, "lr": 1e-3, "warmup": 100, "ema": 0.995},
    "small": {"steps": 20000, "batch_size": 64, "lr": 3e-4, "warmup": 1000, "ema": 0.999},
    "default": {"steps": 100000, "batch_size": 128, "lr": 1e-4, "warmup": 2000, "ema": 0.9995},
}


def checked_config(cls: Any, d: dict[str, Any]) -> Any:
    """A generator config dataclass from a dict; unknown keys are a one-line InputError."""
    known = [f.name for f in fields(cls)]
    unknown = sorted(set(d) - set(known))
    if unknown:
        raise InputError(f"unknown generator config key(s) {unknown}", f"known keys: {', '.join(known)}")
    return cls(**d)


@dataclass
class GenTrainConfig:
    """How a generator is trained. `from_dict` rejects unknown keys."""

    preset: str = "tiny"  # generator size: tiny | small | default
    steps: int | None = None  # None: the preset's
    batch_size: int | None = None
    lr: float | None = None
    warmup: int | None = None
    ema: float | None = None
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    permute: float = 0.5  # probability of a (shared) channel permutation per pair
    site_dropout: float = 0.1  # probability of conditioning a pair on "any site"
    fresh_init: float = 0.0  # probability of replacing a pair's start by a fresh (never trained) init
    encoder: str | None = None  # None: the model preset's ("shared")
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"  # auto (bf16 autocast on a GPU, fp32 on the CPU) | fp32 | bf16
    checkpoint_every: int = 250
    log_every: int = 50
    net_arch: str | None = None  # body hash (vectors.base_key) when the zoo holds several architectures
    dataset: str | None = None  # zoo dataset name when it holds several
    tasks: list[str] | None = None  # restrict to runs of these tasks (None: all)

    def __post_init__(self) -> None:
        if self.preset not in TRAIN_PRESETS:
            raise UnknownNameError("generator preset", self.preset, list(TRAIN_PRESETS))
        for k, v in TRAIN_PRESETS[self.preset].items():
            if getattr(self, k) is None:
                setattr(self, k, v)
        if int(self.steps) < 1 or int(self.batch_size) < 1 or float(self.lr) <= 0:  # type: ignore[arg-type]
            raise InputError("steps and batch_size must be >= 1 and lr > 0", "fix the generator config")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise UnknownNameError("precision", self.precision, ["auto", "fp32", "bf16"])
        if not (0 <= self.permute <= 1 and 0 <= self.site_dropout <= 1 and 0 <= self.fresh_init <= 1):
            raise InputError(
                "permute and site_dropout are probabilities in [0, 1]", "fix the generator config"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GenTrainConfig:
        return checked_config(cls, d)

    def identity(self) -> dict[str, Any]:
        d = self.to_dict()
        for k in ("device", "checkpoint_every", "log_every"):
            d.pop(k)
        return d


# ---- the training data ------------------------------------------------------------------------------
@dataclass
class ZooPairs:
    """Checkpoints of a set of runs as task-layout vectors, and the (i, j) pairs to learn from.

    vectors [N, numel] raw float32; run_of [N]; metrics [N, K] (NaN: no such output / undefined);
    masks [R, numel] bool per run; site_weights [R, S]; pairs [P, 2] long (i, j), same run, step_i < step_j.
    """

    layout: TaskLayout
    sites: list[str]
    vectors: torch.Tensor
    run_of: torch.Tensor
    metrics: torch.Tensor
    masks: torch.Tensor
    site_weights: torch.Tensor
    pairs: torch.Tensor
    run_ids: list[str]
    ckpt_ids: list[str]
    kinds: list[str] = field(default_factory=list)
    fresh: torch.Tensor | None = None  # [F, numel] fresh initialisations (fresh_init augmentation)
    fresh_metric: torch.Tensor | None = None  # [K] their typical Dice (median of the zoo's inits)

    def to(self, device: torch.device) -> ZooPairs:
        """The same data on `device` (batches are then drawn there: no host-to-device copy per step)."""
        return replace(
            self,
            **{f.name: getattr(self, f.name).to(device) for f in fields(self)
               if isinstance(getattr(self, f.name), torch.Tensor)},
        )  # fmt: skip


def _pick_body(zoo: Zoo, runs: list[Any], net_arch: str | None) -> tuple[str, ArchSpec]:
    bodies: dict[str, ArchSpec] = {}
    for r in runs:
        spec = zoo.spec(r.arch_hash)
        bodies.setdefault(base_key(spec), spec)
    if net_arch is not None:
        if net_arch not in bodies:
            raise UnknownNameError("zoo architecture", net_arch, list(bodies), zoo.path)
        return net_arch, bodies[net_arch]
    if len(bodies) != 1:
        desc = [f"{k} ({b.arch_kwargs['features_per_stage']})" for k, b in bodies.items()]
        raise InputError(
            f"the zoo's training runs use {len(bodies)} architectures: {', '.join(desc) or 'none'}",
            "choose one with --net-arch HASH" if bodies else "build the zoo first (`weightzoo zoo build`)",
            zoo.path,
        )
    return next(iter(bodies.items()))


def select_runs(zoo: Zoo, split: str, cfg: GenTrainConfig) -> tuple[list[Any], str, ArchSpec]:
    """Runs of `split` (of the chosen dataset, body and tasks) with at least two checkpoints."""
    runs = [r for r in zoo.runs(split=split) if r.n_checkpoints >= (2 if split == "train" else 1)]
    datasets = sorted({r.dataset for r in runs if r.dataset is not None})
    if cfg.dataset is not None:
        if cfg.dataset not in datasets:
            raise UnknownNameError("zoo dataset", cfg.dataset, datasets, zoo.path)
        runs = [r for r in runs if r.dataset == cfg.dataset]
    elif len(datasets) > 1:
        raise InputError(
            f"the zoo holds runs of {len(datasets)} datasets", f"choose one: {', '.join(datasets)}"
        )
    if cfg.tasks:
        runs = [r for r in runs if set(r.tasks) <= set(cfg.tasks)]
    if not runs:
        raise InputError(
            f"the zoo has no {split}-split runs with checkpoints", "build (more of) the zoo", zoo.path
        )
    key, spec = _pick_body(zoo, runs, cfg.net_arch)
    return [r for r in runs if base_key(zoo.spec(r.arch_hash)) == key], key, spec


def load_pairs(zoo: Zoo, runs: Sequence[Any], layout: TaskLayout, sites: Sequence[str]) -> ZooPairs:
    """Read every checkpoint of `runs` into task-layout vectors; pairs (i, j) with i earlier than j."""
    vecs, run_of, metrics, masks, site_w, pairs, ckpt_ids, kinds = [], [], [], [], [], [], [], []
    for ri, run in enumerate(runs):
        ckpts = sorted(zoo.checkpoints(run_id=run.run_id), key=lambda c: c.step)
        mask = None
        first = len(vecs)
        for c in ckpts:
            v, mask = layout.embed(zoo.load(c), run.tasks)
            vecs.append(v)
            run_of.append(ri)
            m = [math.nan] * len(layout.tasks)
            for t in run.tasks:
                val = c.metrics.get(t, {}).get(METRIC)
                m[layout.tasks.index(t)] = math.nan if val is None else float(val)
            metrics.append(m)
            ckpt_ids.append(c.ckpt_id)
            kinds.append(c.kind)
        n = len(vecs) - first
        pairs += [(first + a, first + b) for a in range(n) for b in range(a + 1, n)]
        masks.append(mask if mask is not None else layout.mask(run.tasks))
        w = torch.zeros(len(sites))
        for s in run.sites:
            if s in sites:
                w[sites.index(s)] = 1.0
        site_w.append(w)
    if not vecs:
        raise InputError("the selected runs hold no checkpoints", "build the zoo first", zoo.path)
    return ZooPairs(
        layout,
        list(sites),
        torch.stack(vecs),
        torch.tensor(run_of),
        torch.tensor(metrics, dtype=torch.float32),
        torch.stack(masks),
        torch.stack(site_w),
        torch.tensor(pairs, dtype=torch.long).reshape(-1, 2),
        [r.run_id for r in runs],
        ckpt_ids,
        kinds,
    )


def zoo_stats(
    zoo: Zoo, runs: Sequence[Any], layout: TaskLayout, data: ZooPairs
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor mean/std ([n_tensors] each) of the training runs' values, from `Zoo.norm_stats`
    (running sums the zoo keeps), pooled over the runs' architectures; tensors the zoo has no sums for
    (an old or ingested zoo) fall back to the loaded vectors."""
    names = layout.layout.names
    n_tot = dict.fromkeys(names, 0.0)
    s1 = dict.fromkeys(names, 0.0)
    s2 = dict.fromkeys(names, 0.0)
    for h in sorted({r.arch_hash for r in runs}):
        numel = {t.name: t.numel for t in ParamLayout.for_spec(zoo.spec(h)).tensors}
        try:
            st = zoo.norm_stats(h, split="train")  # TensorStats in ParamLayout order
        except InputError:
            continue
        for name, m, sd in zip(st.names, st.mean.tolist(), st.std.tolist(), strict=True):
            if name in n_tot:
                n = st.count * numel.get(name, 0)
                n_tot[name] += n
                s1[name] += n * m
                s2[name] += n * (sd**2 + m**2)
    ids = layout.layout.segment_ids()
    mean = torch.zeros(len(names), dtype=torch.float64)
    std = torch.zeros(len(names), dtype=torch.float64)
    for k, name in enumerate(names):
        if n_tot[name] > 0:
            mean[k] = s1[name] / n_tot[name]
            std[k] = math.sqrt(max(s2[name] / n_tot[name] - mean[k].item() ** 2, 0.0))
        else:  # from the loaded vectors, present elements only
            sel = ids == k
            vals = data.vectors[:, sel][data.masks[data.run_of][:, sel]].double()
            mean[k], std[k] = (vals.mean(), vals.std()) if vals.numel() > 1 else (0.0, 1.0)
    return mean.float(), std.clamp_min(1e-6).float()


# ---- the folder -------------------------------------------------------------------------------------
def _jsonable(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def save_state(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    blob = safetensors_bytes(
        {k: v.detach().cpu().contiguous() for k, v in tensors.items()},
        metadata={"state": json.dumps(_jsonable(meta))},
    )
    atomic_write_bytes(path, blob)


def training_state(
    model: torch.nn.Module, ema: EMA, opt: torch.optim.Optimizer
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A training checkpoint as (tensors, metadata): model, EMA and optimizer state (no pickle)."""
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors.update({f"ema.{k}": v for k, v in ema.model.state_dict().items()})
    od = opt.state_dict()
    for pid, ps in od["state"].items():
        for k, v in ps.items():
            tensors[f"optim.{pid}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
    return tensors, {"ema_n": ema.n, "param_groups": od["param_groups"]}


def restore_training_state(
    tensors: dict[str, torch.Tensor],
    st: dict[str, Any],
    model: torch.nn.Module,
    ema: EMA,
    opt: torch.optim.Optimizer,
) -> None:
    """The inverse of `training_state`."""
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    ema.model.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
    ema.n = int(st["ema_n"])
    opt_state = {
        int(pid): {k.split(".", 2)[2]: tensors[k] for k in tensors if k.startswith(f"optim.{pid}.")}
        for pid in {k.split(".")[1] for k in tensors if k.startswith("optim.")}
    }
    opt.load_state_dict({"state": opt_state, "param_groups": st["param_groups"]})


def read_state(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, metadata) of a safetensors file written by `save_state`, with one-line errors."""
    try:
        with safe_open(str(path), "pt") as f:
            meta = json.loads((f.metadata() or {}).get("state", "{}"))
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
        return tensors, meta
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelError(
            f"cannot read generator weights ({e})", "re-run `weightzoo generate train`", path
        ) from None


def read_generator_json(folder: str | Path) -> dict[str, Any]:
    from weightzoo.schemas import GENERATOR_JSON

    return read_folder_description(
        folder, GEN_JSON, GEN_FORMAT, "weightzoo generate train", "generator", schema=GENERATOR_JSON
    )


def build_model(meta: dict[str, Any]) -> tuple[ParamDiffusion, TaskLayout]:
    layout = TaskLayout(ArchSpec.from_dict(meta["body"]), meta["tasks"])
    model = ParamDiffusion(
        layout.layout, len(meta["tasks"]), len(meta["sites"]), DiffusionConfig.from_dict(meta["model"])
    )
    return model, layout


# ---- training ---------------------------------------------------------------------------------------
def _lr_at(cfg: GenTrainConfig, step: int) -> float:
    lr, warm, steps = float(cfg.lr), int(cfg.warmup), int(cfg.steps)  # type: ignore[arg-type]
    if step < warm:
        return lr * (step + 1) / warm
    return lr * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))


def _perm_pool(layout: TaskLayout, seed: int) -> torch.Tensor:
    """[n, numel] random permutation indices (n sized so the pool stays under ~64 MB)."""
    n = int(min(256, max(4, 64 * 2**20 // (8 * layout.numel))))
    g = torch.Generator().manual_seed(seed)
    return torch.stack([layout.perm_index(g) for _ in range(n)])


@dataclass
class Scales:
    """Per-element scales ([numel] each): parameters' zoo mean/std, the RMS of updates, and which
    elements ever change (`trainable`): a tensor no training pair updates (e.g. the unused deep-
    supervision seg layer) is kept as it starts, never generated."""

    mean: torch.Tensor
    std: torch.Tensor
    update: torch.Tensor
    trainable: torch.Tensor

    @classmethod
    def per_tensor(
        cls, layout: TaskLayout, mean: list[float], std: list[float], update: list[float]
    ) -> Scales:
        ids = layout.layout.segment_ids()
        m, s, u = (torch.tensor(v, dtype=torch.float32)[ids] for v in (mean, std, update))
        return cls(m, s.clamp_min(1e-6), u.clamp_min(1e-6), u > 0)

    def to(self, device: torch.device) -> Scales:
        return Scales(*(getattr(self, f.name).to(device) for f in fields(self)))


def update_rms(data: ZooPairs, layout: TaskLayout) -> torch.Tensor:
    """[n_tensors] RMS of θ_j − θ_i per tensor over every pair (i < j) of a run, as `load_pairs` makes
    them. No pair is materialised: per run of n checkpoints, Σ_{a<b} (θ_b − θ_a)² = n · Σ_k (θ_k − θ̄)²."""
    ids = layout.layout.segment_ids()
    sq = torch.zeros(len(layout.layout.tensors), dtype=torch.float64)
    cnt = torch.zeros_like(sq)
    for r in range(len(data.masks)):
        rows = torch.nonzero(data.run_of == r).flatten()
        n = len(rows)
        if n < 2:
            continue
        v = data.vectors[rows] - data.vectors[rows[0]]  # a tensor training never changes stays exactly 0
        m = data.masks[r]
        sq.index_add_(0, ids, (n * (v - v.mean(0)).pow_(2).sum(0) * m).double())
        cnt.index_add_(0, ids, m.double() * (n * (n - 1) / 2))
    return (sq / cnt.clamp_min(1)).sqrt().float()  # exactly 0 for tensors training never changes


FRESH_POOL = 64
FRESH_SEED = 20_000_000  # fresh-init augmentation seeds: FRESH_SEED + 1000·seed + k (no zoo or eval seed)


def fresh_inits(layout: TaskLayout, n: int, seed: int) -> torch.Tensor:
    """[n, numel] initialisations (all outputs) of the layout's network that no zoo run started from."""
    from weightzoo.nets.unet import build_network, real_state_dict

    return torch.stack(
        [
            layout.embed(
                real_state_dict(build_network(layout.spec, seed=FRESH_SEED + 1000 * seed + k)), layout.tasks
            )[0]
            for k in range(n)
        ]
    )


def make_batch(
    data: ZooPairs,
    norm: Scales,
    cfg: GenTrainConfig,
    g: torch.Generator,
    pool: torch.Tensor | None,
    timesteps: int,
    pair_rows: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """A training batch drawn with generator `g` (CPU): standardised start, scaled update (`target`),
    mask, conditioning, t and noise. `pair_rows` fixes the pairs (for evaluation); otherwise they are drawn uniformly.

    The batch is built where `data` lives (`ZooPairs.to`); every draw comes from `g`, and on a GPU the
    noise from a device generator seeded by `g`, so a seed gives the same batches on one device."""
    dev = data.vectors.device
    B = int(cfg.batch_size)  # type: ignore[arg-type]
    rows = pair_rows if pair_rows is not None else torch.randint(len(data.pairs), (B,), generator=g)
    rows = rows.to(dev)
    B = len(rows)
    i, j = data.pairs[rows, 0], data.pairs[rows, 1]
    run = data.run_of[i]
    mask = data.masks[run] & norm.trainable
    src, current = data.vectors[i].clone(), data.metrics[i].clone()
    u_fresh = torch.rand(B, generator=g).to(dev)
    f_pick = torch.randint(len(data.fresh) if data.fresh is not None else 1, (B,), generator=g).to(dev)
    if data.fresh is not None and data.fresh_metric is not None:
        sel = u_fresh < cfg.fresh_init  # start from a network the zoo never saw, at its typical Dice
        src[sel] = data.fresh[f_pick[sel]]
        current[sel] = torch.where(
            torch.isfinite(current[sel]), data.fresh_metric.expand(int(sel.sum()), -1), current[sel]
        )
    start = (src - norm.mean) / norm.std * mask
    target = (data.vectors[j] - src) / norm.update * mask
    u_perm = torch.rand(B, generator=g)
    pick = torch.randint(len(pool) if pool is not None else 1, (B,), generator=g)
    if pool is not None:
        for b in torch.nonzero(u_perm < cfg.permute).flatten().tolist():
            idx = pool[pick[b]]
            start[b], target[b], mask[b] = start[b, idx], target[b, idx], mask[b, idx]
    site_w = data.site_weights[run].clone()
    site_w[(torch.rand(B, generator=g) < cfg.site_dropout).to(dev)] = 0.0
    t = torch.randint(timesteps, (B,), generator=g)
    if dev.type == "cpu":
        noise = torch.randn(start.shape, generator=g)
    else:
        g_dev = torch.Generator(dev).manual_seed(int(torch.randint(2**62, (1,), generator=g)))
        noise = torch.randn(start.shape, generator=g_dev, device=dev)
    return {
        "start": start,
        "target": target,
        "mask": mask,
        "current": current,
        "goal": data.metrics[j],
        "site": site_w,
        "t": t.to(dev),
        "noise": noise,
    }


def batch_loss(
    model: ParamDiffusion, batch: dict[str, torch.Tensor], alpha_bar: torch.Tensor
) -> torch.Tensor:
    """Masked MSE of the x0 (scaled update) prediction; 1.0 = predicting no update."""
    x_t = q_sample(batch["target"], batch["t"], alpha_bar, batch["noise"])
    pred = model(x_t, batch["t"], batch["start"], batch["current"], batch["goal"], batch["site"]).float()
    m = batch["mask"].to(pred.dtype)
    return ((pred - batch["target"]) ** 2 * m).sum() / m.sum().clamp_min(1)


def _step_generator(seed: int, step: int) -> torch.Generator:
    s = int(np.random.SeedSequence([seed, step, 0x6E]).generate_state(1, np.uint64)[0])
    return torch.Generator().manual_seed(s)


@dataclass
class GenTrainResult:
    out_dir: Path
    steps: int
    seconds: float
    history: list[dict[str, Any]]
    meta: dict[str, Any]
    skipped: bool = False


def _summaries(data: ZooPairs, layout: TaskLayout) -> dict[str, Any]:
    """Ranges of the training zoo that sampling checks against or defaults to."""
    rms = layout.tensor_rms(data.vectors, data.masks[data.run_of])  # [N, n_tensors]
    out: dict[str, Any] = {
        "rms_min": rms.min(0).values.tolist(),
        "rms_max": rms.max(0).values.tolist(),
        "metric_min": {},
        "metric_max": {},
        "init_metric": {},
    }
    is_init = torch.tensor([k == "init" for k in data.kinds])
    for k, t in enumerate(layout.tasks):
        col = data.metrics[:, k]
        ok = torch.isfinite(col)
        if ok.any():
            out["metric_min"][t], out["metric_max"][t] = float(col[ok].min()), float(col[ok].max())
        ok_init = ok & is_init
        if ok_init.any():
            out["init_metric"][t] = float(col[ok_init].median())
    return out


def train_generator(
    zoo: Zoo | str | Path,
    out_dir: str | Path,
    cfg: GenTrainConfig | None = None,
    model_overrides: dict[str, Any] | None = None,
    resume: bool = True,
    force: bool = False,
    log: Callable[[str], None] | None = None,
    stop_after: int | None = None,
) -> GenTrainResult:
    """Train a generator on `zoo`'s training runs and write the gen/ folder (see the module docstring).

    model_overrides: DiffusionConfig keys that replace the preset's (e.g. {"encoder": "per_layer"}).
    stop_after: stop (as if killed) after this many steps, leaving the checkpoint — for tests.
    """
    cfg = cfg or GenTrainConfig()
    zoo = zoo if isinstance(zoo, Zoo) else Zoo(zoo)
    out_dir = Path(out_dir)
    mcfg = DiffusionConfig.preset(
        cfg.preset, **({"encoder": cfg.encoder} if cfg.encoder else {}), **(model_overrides or {})
    )
    runs, key, body = select_runs(zoo, "train", cfg)
    tasks = sorted({t for r in runs for t in r.tasks})
    sites = sorted({s for r in runs for s in r.sites})
    layout = TaskLayout(body, tasks)
    identity = _jsonable(
        {
            "train": cfg.identity(),
            "model": mcfg.to_dict(),
            "runs": [r.run_id for r in runs],
            "zoo": str(zoo.path.resolve()),
        }
    )
    if force:
        for name in (GEN_JSON, GEN_WEIGHTS, GEN_LOG, GEN_CKPT):
            (out_dir / name).unlink(missing_ok=True)
    if (out_dir / GEN_JSON).exists():
        meta = read_generator_json(out_dir)
        if meta.get("identity") != identity:
            raise ModelError(
                "the folder holds a generator trained differently (other config, model or zoo runs)",
                "use another --out, or --force to overwrite it",
                out_dir,
            )
        hist = (
            read_json(out_dir / GEN_LOG, "generator log").get("history", [])
            if (out_dir / GEN_LOG).exists()
            else []
        )
        return GenTrainResult(
            out_dir, int(meta["steps_done"]), float(meta["seconds"]), hist, meta, skipped=True
        )

    say = log or (lambda s: None)
    t_load = time.perf_counter()
    data = load_pairs(zoo, runs, layout, sites)
    if cfg.fresh_init > 0:
        data.fresh = fresh_inits(layout, FRESH_POOL, cfg.seed)
        init_metric = _summaries(data, layout)["init_metric"]
        data.fresh_metric = torch.tensor([init_metric.get(t, math.nan) for t in tasks], dtype=torch.float32)
    val_runs = [
        r
        for r in zoo.runs(split="val")
        if base_key(zoo.spec(r.arch_hash)) == key and set(r.tasks) <= set(tasks)
    ]
    val_runs = [
        r for r in val_runs if r.n_checkpoints >= 2 and (cfg.dataset is None or r.dataset == cfg.dataset)
    ]
    val_data = load_pairs(zoo, val_runs, layout, sites) if val_runs else None
    mean_t, std_t = zoo_stats(zoo, runs, layout, data)
    upd_t = update_rms(data, layout)
    norm = Scales.per_tensor(layout, mean_t.tolist(), std_t.tolist(), upd_t.tolist())
    say(
        f"{len(runs)} training runs, {len(data.vectors)} checkpoints, {len(data.pairs)} pairs; "
        f"tasks {', '.join(tasks)}; sites {', '.join(sites)}; {layout.numel:,} parameters per network "
        f"(loaded in {time.perf_counter() - t_load:.1f} s)"
    )
    rc = runs[0].config
    prep = runs[0].info.get("preprocessing") or {  # zoo builds record it; older zoos: from the recipe
        "normalization": rc.get("normalization", "zscore"),
        "size": list(rc.get("size", [64, 64])),
        "axis": int(rc.get("axis", 2)),
        "channels": body.input_channels,
    }

    dp, device = DataParallel.start(None, resolve_device(cfg.device), "generator", local_sgd=False)
    identity = {**identity, **dp.identity()}
    torch.manual_seed(cfg.seed)
    model = ParamDiffusion(layout.layout, len(tasks), len(sites), mcfg).to(device)
    wrapped = dp.wrap(model, static_graph=False)  # before restoring: DDP broadcasts rank 0's weights
    ema = EMA(model, float(cfg.ema))  # type: ignore[arg-type]
    opt = torch.optim.AdamW(model.parameters(), lr=float(cfg.lr), weight_decay=cfg.weight_decay)  # type: ignore[arg-type]
    alpha_bar = cosine_alpha_bar(mcfg.timesteps).to(device)
    pool = _perm_pool(layout, cfg.seed) if cfg.permute > 0 else None
    summaries = _summaries(data, layout)
    if device.type != "cpu":  # draw batches on the device: no per-step copy of [B, numel] tensors
        data, norm = data.to(device), norm.to(device)
        val_data = val_data.to(device) if val_data is not None else None
        pool = pool.to(device) if pool is not None else None
    amp = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    start, history, seconds_before = 0, [], 0.0
    ckpt_path = out_dir / GEN_CKPT
    if ckpt_path.exists() and resume:
        tensors, st = read_state(ckpt_path)
        if st.get("identity") != identity:
            raise ModelError(
                "it holds a generator checkpoint of another configuration",
                "use another --out, or --force to start again",
                out_dir,
            )
        restore_training_state(tensors, st, model, ema, opt)
        start, history, seconds_before = int(st["step"]), st["history"], float(st["seconds"])
        say(f"resumed from step {start}")
    dp.barrier()
    if dp.is_writer:
        out_dir.mkdir(parents=True, exist_ok=True)

    to_dev = {"start", "target", "mask", "current", "goal", "site", "t", "noise"}
    val_rows = None
    if val_data is not None and len(val_data.pairs):
        val_rows = torch.randperm(len(val_data.pairs), generator=torch.Generator().manual_seed(cfg.seed))[:64]
    t0 = time.perf_counter()

    def seconds() -> float:
        return seconds_before + time.perf_counter() - t0

    def checkpoint(step: int) -> None:
        tensors, st = training_state(model, ema, opt)
        save_state(
            ckpt_path,
            tensors,
            {**st, "identity": identity, "step": step, "history": history, "seconds": seconds()},
        )

    @torch.no_grad()
    def val_loss() -> float | None:
        if val_data is None or val_rows is None:
            return None
        b = make_batch(
            val_data, norm, cfg, torch.Generator().manual_seed(cfg.seed + 1), None, mcfg.timesteps, val_rows
        )
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            return float(batch_loss(ema.model, {k: v.to(device) for k, v in b.items()}, alpha_bar))

    model.train()
    run_loss, run_n = 0.0, 0
    steps = int(cfg.steps)  # type: ignore[arg-type]
    for step in range(start, steps):
        for group in opt.param_groups:
            group["lr"] = _lr_at(cfg, step)
        batch = make_batch(data, norm, cfg, _step_generator(cfg.seed, step), pool, mcfg.timesteps)
        batch = dp.take_rows(batch, int(cfg.batch_size))  # type: ignore[arg-type]  # torchrun: own rows
        batch = {k: (v.to(device) if k in to_dev else v) for k, v in batch.items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = batch_loss(wrapped, batch, alpha_bar)  # type: ignore[arg-type]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        ema.update(model)
        loss_value = float(loss.detach())
        if not math.isfinite(loss_value):
            raise ModelError(
                f"the generator's loss became {loss_value} at step {step}", "lower --lr and retrain"
            )
        run_loss += loss_value
        run_n += 1
        done = step + 1
        if (done % cfg.log_every == 0 or done == steps) and dp.is_writer:
            entry = {"step": done, "loss": run_loss / run_n, "val_loss": val_loss(), "lr": _lr_at(cfg, step)}
            entry["seconds"] = round(seconds(), 2)
            history.append(entry)
            run_loss, run_n = 0.0, 0
            atomic_write_json(out_dir / GEN_LOG, {"history": _jsonable(history)})
            vl = entry["val_loss"]
            say(
                f"step {done}/{steps} · loss {entry['loss']:.4f}"
                + (f" · val-run loss {vl:.4f}" if vl is not None else "")
            )
        if done % cfg.checkpoint_every == 0 and done < steps and dp.is_writer:
            checkpoint(done)
        if stop_after is not None and done >= stop_after and done < steps:
            if dp.is_writer:
                checkpoint(done)
            return GenTrainResult(out_dir, done, seconds(), history, {})

    total = seconds()
    meta = {
        "format": GEN_FORMAT,
        "version": 1,
        "identity": identity,
        "model": mcfg.to_dict(),
        "train": cfg.to_dict(),
        "tasks": tasks,
        "sites": sites,
        "body": body.to_dict(),
        "body_key": key,
        "preprocessing": prep,
        "metric": METRIC,
        "zoo": str(zoo.path.resolve()),
        "dataset": runs[0].dataset,
        "train_runs": [r.run_id for r in runs],
        "n_checkpoints": len(data.vectors),
        "n_pairs": len(data.pairs),
        "norm": {
            "names": layout.layout.names,
            "mean": mean_t.tolist(),
            "std": std_t.tolist(),
            "update": upd_t.tolist(),
        },
        **summaries,
        "steps_done": steps,
        "seconds": total,
        "device": str(device),
        "precision": "bf16 autocast" if amp else "fp32",
        **dp.summary(),
        "n_params": sum(p.numel() for p in model.parameters()),
        "finished": True,
    }
    if dp.is_writer:  # under torchrun, rank 0 alone writes
        save_state(out_dir / GEN_WEIGHTS, ema.model.state_dict(), {"format": GEN_FORMAT})
        atomic_write_json(out_dir / GEN_LOG, {"history": _jsonable(history)})
        atomic_write_json(out_dir / GEN_JSON, _jsonable(meta))
        ckpt_path.unlink(missing_ok=True)
    dp.barrier()
    return GenTrainResult(out_dir, steps, total, history, meta)
