"""Generator v2: a diffusion model over DELTAS from one base network, conditioned on a task set and a
site seen through a few unlabelled images (p-diff style, without a Dice prompt).

Why deltas: fine-tunes of one shared base stay in one basin (docs/generate.md), so their deltas
θ − θ_base form a small, well-behaved distribution; generating full weights across basins (G.pt
route, `generate/train.py`) averages basins and breaks networks.

    zoo (fine-tunes of one base, `trainable: SUBSET`)          # weightzoo.zoo.base
      └─ final checkpoint of each TRAINING-split run  →  d = θ − θ_base[tasks]    over SUBSET's tensors
         placed in the base's full task layout (seg-layer row k = base task k; rows of tasks the run
         did not learn are unknown and masked out of the loss)
    x0  = (d − mean_d) / rms_tensor          # per entry mean over runs, per tensor RMS: [D]
    c   = [multi-hot task set [K], site embedding (standardised) [E], site-known flag]
    model(x_t, t, c) → x0                     # residual MLP with FiLM conditioning (DeltaDenoiser)

Training draws each example's site embedding from a random 1..`images_per_site` of the run's sites'
TRAINING images (weightzoo.generate.site_embedding), so sampling works from any few unlabelled images;
with probability `site_dropout` the site is "unknown" (sampling without images). The output layer
starts at zero: an untrained generator returns base + mean delta, the uniform soup of all deltas.

Sampling: N candidates at once (different noise), deterministic DDIM, θ = θ_base[tasks] + d; each is
checked (finite, every tensor's RMS within the zoo's range ×/÷ RMS_MARGIN) before it is written.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from weightzoo.data.raw import RawDataset
from weightzoo.data.slices import Preprocessing
from weightzoo.errors import InputError, ModelError, UnknownNameError
from weightzoo.fileio import atomic_write_bytes, atomic_write_json
from weightzoo.generate.diffusion import EMA, cosine_alpha_bar, q_sample, sinusoidal
from weightzoo.generate.site_embedding import embed_sites, site_embedding
from weightzoo.generate.train import (
    GEN_CKPT,
    GEN_FORMAT,
    GEN_JSON,
    GEN_LOG,
    GEN_WEIGHTS,
    checked_config,
    read_state,
    restore_training_state,
    save_state,
    training_state,
)
from weightzoo.nets.unet import build_network, load_real_state_dict
from weightzoo.segmenter import resolve_device
from weightzoo.train.config import TRAINABLE
from weightzoo.train.distributed import DataParallel
from weightzoo.zoo.base import SEG_PREFIX, BaseNet, is_trainable, restrict_to_tasks
from weightzoo.zoo.store import Zoo

KIND = "delta"
BASE_FILE = "base.safetensors"  # the generator folder keeps its base: sampling needs no zoo
RMS_MARGIN = 2.0


@dataclass
class DeltaGenConfig:
    """How a delta generator is trained. `from_dict` rejects unknown keys."""

    subset: str = "norm_seg"  # runs fine-tuned with `trainable: subset` (their deltas are generated)
    hidden: int = 512
    depth: int = 3
    steps: int = 2000
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    ema: float = 0.995
    timesteps: int = 1000
    images_per_site: int = 8  # a training site embedding averages 1..this many random images
    site_dropout: float = 0.1
    seed: int = 0
    device: str = "cpu"
    checkpoint_every: int = 500

    def __post_init__(self) -> None:
        if self.subset not in TRAINABLE:
            raise UnknownNameError("trainable subset", self.subset, TRAINABLE)
        if (
            min(self.hidden, self.depth, self.steps, self.batch_size, self.images_per_site) < 1
            or self.lr <= 0
        ):
            raise InputError(
                "hidden, depth, steps, batch_size, images_per_site must be >= 1 and lr > 0",
                "fix the generator config",
            )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DeltaGenConfig:
        return checked_config(cls, d)

    def identity(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("device", "checkpoint_every"):
            d.pop(k)
        return d


# ---- the vector layout ------------------------------------------------------------------------------
class DeltaLayout:
    """The generated entries: SUBSET's tensors of the base, in its full task layout, flattened."""

    def __init__(self, base: BaseNet, subset: str):
        self.base, self.subset = base, subset
        self.names = sorted(k for k in base.state if is_trainable(k, subset))  # stable across processes
        self.shapes = [tuple(base.state[k].shape) for k in self.names]
        sizes = [math.prod(s) for s in self.shapes]
        self.offsets = np.cumsum([0, *sizes]).tolist()
        self.numel = int(self.offsets[-1])

    def tensor_ids(self) -> torch.Tensor:
        """[D] index of the tensor each entry belongs to."""
        return torch.repeat_interleave(
            torch.arange(len(self.names)),
            torch.tensor([b - a for a, b in zip(self.offsets, self.offsets[1:], strict=False)]),
        )

    def run_vector(
        self, state: dict[str, torch.Tensor], tasks: Sequence[str]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(delta [D], known [D] bool) of a run's state (outputs `tasks`) against the base."""
        rows = [self.base.tasks.index(t) for t in tasks]
        vec, known = torch.zeros(self.numel), torch.zeros(self.numel, dtype=torch.bool)
        start = restrict_to_tasks(self.base.state, self.base.tasks, tasks)
        for k, a, b, shape in zip(self.names, self.offsets, self.offsets[1:], self.shapes, strict=False):
            d = state[k].float() - start[k]
            if k.startswith(SEG_PREFIX):
                full, mask = torch.zeros(shape), torch.zeros(shape, dtype=torch.bool)
                full[rows], mask[rows] = d, True
                vec[a:b], known[a:b] = full.flatten(), mask.flatten()
            else:
                vec[a:b], known[a:b] = d.flatten(), True
        return vec, known

    def state(self, delta: torch.Tensor, tasks: Sequence[str]) -> dict[str, torch.Tensor]:
        """The network with outputs `tasks`: base + delta, restricted to `tasks`."""
        full = dict(self.base.state)
        for k, a, b, shape in zip(self.names, self.offsets, self.offsets[1:], self.shapes, strict=False):
            full[k] = self.base.state[k] + delta[a:b].reshape(shape).to(full[k].dtype)
        return restrict_to_tasks(full, self.base.tasks, tasks)


# ---- the denoiser -----------------------------------------------------------------------------------
class FiLMBlock(nn.Module):
    """h + W2·SiLU(W1·(LN(h)·(1 + scale) + shift)), scale/shift from the condition: [B, H] -> [B, H]."""

    def __init__(self, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden, elementwise_affine=False)
        self.film = nn.Linear(hidden, 2 * hidden)
        self.mlp = nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.SiLU(), nn.Linear(2 * hidden, hidden))

    def forward(self, h: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        scale, shift = self.film(cond).chunk(2, dim=-1)
        return h + self.mlp(self.norm(h) * (1 + scale) + shift)


class DeltaDenoiser(nn.Module):
    """x0-prediction: (x_t [B, D], t [B], tasks [B, K], site [B, E], known [B, 1]) -> x0 [B, D]."""

    def __init__(self, dim: int, n_tasks: int, emb_dim: int, hidden: int, depth: int):
        super().__init__()
        self.hidden = hidden
        self.inp = nn.Linear(dim, hidden)
        self.cond = nn.Sequential(
            nn.Linear(n_tasks + emb_dim + 1 + hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden)
        )
        self.blocks = nn.ModuleList(FiLMBlock(hidden) for _ in range(depth))
        self.out = nn.Linear(hidden, dim)
        nn.init.zeros_(self.out.weight)  # untrained: x0 = 0, i.e. the mean delta (the zoo's soup)
        nn.init.zeros_(self.out.bias)

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, tasks: torch.Tensor, site: torch.Tensor, known: torch.Tensor
    ) -> torch.Tensor:
        c = self.cond(torch.cat([tasks, site * known, known, sinusoidal(t, self.hidden)], -1))
        h = self.inp(x)
        for blk in self.blocks:
            h = blk(h, c)
        return self.out(h)


# ---- training data ----------------------------------------------------------------------------------
@dataclass
class DeltaData:
    """Training examples: normalised deltas, masks, task multi-hots and per-site image features."""

    x0: torch.Tensor  # [N, D] normalised
    known: torch.Tensor  # [N, D] bool
    tasks: torch.Tensor  # [N, K]
    sites: list[tuple[str, ...]]  # per example
    run_ids: list[str]


def zoo_base(zoo: Zoo, base_id: str | None = None) -> BaseNet:
    ids = zoo.base_ids()
    if not ids:
        raise InputError(
            "the zoo has no base network: it holds runs from random inits",
            "build a fine-tune zoo (grid key `from: BASE/`), or use `--kind gpt`",
            zoo.path,
        )
    if base_id is None and len(ids) > 1:
        raise InputError(
            f"the zoo holds {len(ids)} bases", f"name one with --base: {', '.join(ids)}", zoo.path
        )
    return zoo.base(base_id or ids[0])


def delta_runs(zoo: Zoo, base_id: str, subset: str, split: str) -> list[Any]:
    """Done runs of `split` fine-tuned from `base_id` with `trainable: subset` (any subset for 'all')."""
    return [
        r
        for r in zoo.runs(split=split, status="done")
        if zoo.run_base(r.run_id) == base_id
        and (subset == "all" or r.config.get("trainable", "all") == subset)
    ]


def load_deltas(zoo: Zoo, runs: Sequence[Any], layout: DeltaLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, D] raw deltas and [N, D] masks of the runs' final checkpoints."""
    vecs, masks = [], []
    for r in runs:
        final = max(zoo.checkpoints(run_id=r.run_id), key=lambda c: c.step)
        v, m = layout.run_vector(zoo.load(final), r.tasks)
        vecs.append(v)
        masks.append(m)
    return torch.stack(vecs), torch.stack(masks)


def delta_stats(
    deltas: torch.Tensor, known: torch.Tensor, layout: DeltaLayout
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean [D] over runs where known, per-tensor RMS of (delta − mean) expanded to [D]). A tensor no
    run changes differently from the mean (e.g. the unused deep-supervision seg layer) has RMS 0: its
    generated delta is exactly the mean."""
    kf = known.float()
    mean = (deltas * kf).sum(0) / kf.sum(0).clamp_min(1)
    dev2 = (deltas - mean) ** 2 * kf
    tid = layout.tensor_ids()
    n_t = torch.zeros(len(layout.names)).index_add_(0, tid, kf.sum(0))
    s_t = torch.zeros(len(layout.names)).index_add_(0, tid, dev2.sum(0))
    return mean, (s_t / n_t.clamp_min(1)).sqrt()[tid]


def zoo_dataset(zoo: Zoo, runs: Sequence[Any], dataset: str | Path | None) -> RawDataset:
    """The dataset the zoo's runs were trained on (recorded path), or `dataset`."""
    import json

    if dataset is not None:
        return RawDataset.open(dataset)
    name = runs[0].dataset
    row = zoo.db.execute("SELECT info FROM datasets WHERE name = ?", (name,)).fetchone()
    path = json.loads(row[0]).get("path") if row and row[0] else None
    if not path or not Path(path).is_dir():
        raise InputError(
            f"the zoo's dataset {name} is not where it was built ({path})",
            "give --dataset data/DatasetXXX_Name",
        )
    return RawDataset.open(path)


def base_network(base: BaseNet) -> nn.Module:
    return load_real_state_dict(build_network(base.spec), base.state).eval()


def _step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(
        int(np.random.SeedSequence([seed, step, 0xD17A]).generate_state(1)[0])
    )


class SiteSampler:
    """Random site embeddings from a few training images: the generator's site augmentation."""

    def __init__(self, feats: dict[str, torch.Tensor], mu: torch.Tensor, sd: torch.Tensor, max_images: int):
        self.feats, self.mu, self.sd, self.max_images = feats, mu, sd, max_images

    def standardise(self, emb: torch.Tensor) -> torch.Tensor:
        return (emb - self.mu) / self.sd

    def draw(self, sites: Sequence[str], g: torch.Generator) -> torch.Tensor:
        pool = torch.cat([self.feats[s] for s in sites if s in self.feats])
        k = int(torch.randint(1, self.max_images + 1, (1,), generator=g))
        idx = torch.randperm(len(pool), generator=g)[: min(k, len(pool))]
        return self.standardise(site_embedding(pool[idx]))


def make_batch(
    data: DeltaData,
    sampler: SiteSampler,
    cfg: DeltaGenConfig,
    g: torch.Generator,
    rows: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """One training batch, every draw from `g`."""
    n = len(data.x0)
    if rows is None:
        rows = torch.randint(0, n, (cfg.batch_size,), generator=g)
    site = torch.stack([sampler.draw(data.sites[int(i)], g) for i in rows])
    known = (torch.rand(len(rows), 1, generator=g) >= cfg.site_dropout).float()
    return {
        "x0": data.x0[rows],
        "mask": data.known[rows].float(),
        "tasks": data.tasks[rows],
        "site": site,
        "known": known,
        "t": torch.randint(0, cfg.timesteps, (len(rows),), generator=g),
        "noise": torch.randn(data.x0[rows].shape, generator=g),
    }


def batch_loss(model: DeltaDenoiser, b: dict[str, torch.Tensor], alpha_bar: torch.Tensor) -> torch.Tensor:
    """Masked MSE of the predicted clean (normalised) delta; 1.0 ≈ predicting the zoo's mean delta."""
    xt = q_sample(b["x0"], b["t"], alpha_bar, b["noise"])
    pred = model(xt, b["t"], b["tasks"], b["site"], b["known"])
    return ((pred - b["x0"]) ** 2 * b["mask"]).sum() / b["mask"].sum().clamp_min(1)


@dataclass
class DeltaTrainResult:
    out: Path
    meta: dict[str, Any]
    history: list[dict[str, Any]]
    seconds: float
    skipped: bool = False


def _tensor_rms_range(zoo: Zoo, runs: Sequence[Any]) -> dict[str, list[float]]:
    lo: dict[str, float] = {}
    hi: dict[str, float] = {}
    for r in runs:
        final = max(zoo.checkpoints(run_id=r.run_id), key=lambda c: c.step)
        for k, v in zoo.load(final).items():
            rms = float(v.float().pow(2).mean().sqrt())
            lo[k], hi[k] = min(lo.get(k, rms), rms), max(hi.get(k, rms), rms)
    return {k: [lo[k], hi[k]] for k in lo}


def train_delta_generator(
    zoo_path: str | Path,
    out: str | Path,
    cfg: DeltaGenConfig,
    dataset: str | Path | None = None,
    base_id: str | None = None,
    resume: bool = True,
    force: bool = False,
    log: Callable[[str], None] = print,
) -> DeltaTrainResult:
    """Train a delta generator on the zoo's TRAINING-split fine-tunes (val-split runs: val loss only;
    test-split runs are never read). Resumable: a killed run continues from its last checkpoint."""
    from weightzoo.generate.train import read_generator_json

    out = Path(out)
    zoo = Zoo(zoo_path)
    base = zoo_base(zoo, base_id)
    layout = DeltaLayout(base, cfg.subset)
    runs = delta_runs(zoo, base.base_id, cfg.subset, "train")
    if len(runs) < 2:
        raise InputError(
            f"the zoo has {len(runs)} finished training-split fine-tunes with trainable '{cfg.subset}'",
            "build more (grid `trainable:` and `seeds:`), or choose another --subset",
            zoo.path,
        )
    val_runs = delta_runs(zoo, base.base_id, cfg.subset, "val")
    identity = {"config": cfg.identity(), "base": base.base_id, "runs": sorted(r.run_id for r in runs)}
    if force:
        for name in (GEN_JSON, GEN_WEIGHTS, GEN_LOG, GEN_CKPT):
            (out / name).unlink(missing_ok=True)
    if (out / GEN_JSON).exists():
        meta = read_generator_json(out)
        if meta.get("identity") != identity:
            raise ModelError(
                "the folder holds a generator trained differently", "use another --out, or --force", out
            )
        return DeltaTrainResult(
            out, meta, meta.get("history", []), float(meta.get("seconds", 0)), skipped=True
        )

    ds = zoo_dataset(zoo, runs, dataset)
    prep = Preprocessing.from_dict({**base.preprocessing, "channels": base.spec.input_channels})
    sites = sorted({s for r in runs + val_runs for s in r.sites})
    feats = embed_sites(base_network(base), ds, sites, prep, "train")
    allf = torch.cat(list(feats.values()))
    mu, sd = allf.mean(0), allf.std(0).clamp_min(1e-6)
    sampler = SiteSampler(feats, mu, sd, cfg.images_per_site)

    deltas, known = load_deltas(zoo, runs, layout)
    mean, rms = delta_stats(deltas, known, layout)

    def as_data(rs: Sequence[Any], d: torch.Tensor, k: torch.Tensor) -> DeltaData:
        hot = torch.tensor([[float(t in r.tasks) for t in base.tasks] for r in rs])
        return DeltaData(
            ((d - mean) / rms.clamp_min(1e-12)) * k,
            k,
            hot,
            [tuple(r.sites) for r in rs],
            [r.run_id for r in rs],
        )

    data = as_data(runs, deltas, known)
    val_data = as_data(val_runs, *load_deltas(zoo, val_runs, layout)) if val_runs else None

    dp, device = DataParallel.start(None, resolve_device(cfg.device), "delta generator", local_sgd=False)
    identity = {**identity, **dp.identity()}
    torch.manual_seed(cfg.seed)
    model = DeltaDenoiser(layout.numel, len(base.tasks), len(mu), cfg.hidden, cfg.depth)
    ema = EMA(model, cfg.ema)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    alpha_bar = cosine_alpha_bar(cfg.timesteps)
    start, history, seconds_before = 0, [], 0.0
    ckpt = out / GEN_CKPT
    if ckpt.exists() and resume:
        tensors, st = read_state(ckpt)
        if st.get("identity") != identity:
            raise ModelError("it holds a generator checkpoint of another configuration", "use --force", out)
        restore_training_state(tensors, st, model, ema, opt)
        start, history, seconds_before = int(st["step"]), st["history"], float(st["seconds"])
        log(f"resumed from step {start}")
    model.to(device)
    ema.model.to(device)
    wrapped = dp.wrap(model, static_graph=False)  # after restoring: every rank has read the same file
    dp.barrier()
    if dp.is_writer:
        out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    def seconds() -> float:
        return seconds_before + time.perf_counter() - t0

    @torch.no_grad()
    def val_loss() -> float | None:
        if val_data is None:
            return None
        b = make_batch(
            val_data,
            sampler,
            cfg,
            torch.Generator().manual_seed(cfg.seed + 1),
            torch.arange(len(val_data.x0)),
        )
        return float(batch_loss(ema.model, {k: v.to(device) for k, v in b.items()}, alpha_bar.to(device)))

    running = 0.0
    for step in range(start, cfg.steps):
        lr = cfg.lr * min(1.0, (step + 1) / 100) * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
        for group in opt.param_groups:
            group["lr"] = lr
        b = dp.take_rows(make_batch(data, sampler, cfg, _step_generator(cfg.seed, step)), cfg.batch_size)
        loss = batch_loss(wrapped, {k: v.to(device) for k, v in b.items()}, alpha_bar.to(device))  # type: ignore[arg-type]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema.update(model)
        running += loss.item()
        if ((step + 1) % 100 == 0 or step + 1 == cfg.steps) and dp.is_writer:
            n = (step % 100) + 1
            history.append(
                {"step": step + 1, "loss": running / n, "val_loss": val_loss(), "seconds": seconds()}
            )
            running = 0.0
        if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps and dp.is_writer:
            tensors, st = training_state(model, ema, opt)
            save_state(
                ckpt,
                tensors,
                {**st, "identity": identity, "step": step + 1, "history": history, "seconds": seconds()},
            )

    site_embs = {s: sampler.standardise(site_embedding(f)).tolist() for s, f in feats.items()}
    weights = {f"model.{k}": v.cpu() for k, v in ema.model.state_dict().items()}
    weights.update({"stats.mean": mean, "stats.rms": rms, "emb.mu": mu, "emb.sd": sd})
    meta = {
        "format": GEN_FORMAT,
        "version": 2,
        "kind": KIND,
        "identity": identity,
        "config": asdict(cfg),
        "base_id": base.base_id,
        "base_model": base.meta,
        "tasks": list(base.tasks),
        "subset": cfg.subset,
        "numel": layout.numel,
        "emb_dim": len(mu),
        "zoo": str(Path(zoo_path).resolve()),
        "dataset": runs[0].dataset,
        "dataset_path": str(ds.root),
        "preprocessing": prep.to_dict(),
        "sites": site_embs,  # seen sites' embeddings (all their training images), standardised
        "rms_range": _tensor_rms_range(zoo, runs),
        "train_runs": [r.run_id for r in runs],
        "val_runs": [r.run_id for r in val_runs],
        "history": history,
        "seconds": seconds(),
        **dp.summary(),
    }
    if dp.is_writer:  # under torchrun, rank 0 alone writes
        save_state(out / GEN_WEIGHTS, weights, {"format": GEN_FORMAT, "kind": KIND})
        atomic_write_bytes(out / BASE_FILE, base.weights)
        atomic_write_json(out / GEN_JSON, meta)
        ckpt.unlink(missing_ok=True)
    dp.barrier()
    last = history[-1] if history else {}
    log(
        f"delta generator: {len(runs)} runs, {layout.numel:,} generated entries ({cfg.subset}), "
        f"final loss {last.get('loss', math.nan):.4f}, val {last.get('val_loss')}"
    )
    return DeltaTrainResult(out, meta, history, seconds())
