"""Train an in-context model (UniverSeg/Tyche-style) on sampled tasks; resumable, logged.

Every step: draw `tasks_per_batch` tasks (weightzoo.incontext.tasks.TaskSampler), each with S + 1
images (S uniform in [support_min, support_max], the same S for the whole batch); the last image is
the query, the others the support. With probability `single_fraction` the step uses one candidate,
otherwise `candidates` (each with its own noise); the loss is Tyche's best-candidate Dice + BCE. Adam,
linear warm-up then cosine decay, gradient clipping. Progressive resizing (`warm_size`,
`warm_fraction`): the first steps run on tasks downsampled to warm_size (4x cheaper at half the side),
the rest at `size`; validation always runs at `size`.

Reproducible and resumable: data, augmentation and noise come from a generator seeded by (seed, step)
alone, so a run resumed from its checkpoint gives the same weights as an uninterrupted one.

Model folder (`out/`):
  config.json        {"format": "weightzoo-incontext", "spec": ..., "train": config, "steps", "seconds",
                      "device", "torch", "command", "n_params", "final": last log entry}
  model.safetensors  the network's state_dict
  log.json           history: step, train loss, lr, val Dice (one candidate / best of K), seconds
  train_log.txt      the same as text lines
  checkpoint.pt/.json  while running (removed when finished)
"""

from __future__ import annotations

import json
import math
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from weightzoo.errors import InputError, ModelError
from weightzoo.fileio import atomic_write_bytes, atomic_write_json, read_json
from weightzoo.incontext.model import InContextNet, InContextSpec, best_candidate_loss, count_parameters
from weightzoo.incontext.tasks import TaskSampler, TaskSource, build_sources
from weightzoo.train.distributed import DataParallel

CONFIG_JSON, WEIGHTS, LOG_JSON, LOG_TXT = "config.json", "model.safetensors", "log.json", "train_log.txt"
CKPT_PT, CKPT_JSON = "checkpoint.pt", "checkpoint.json"
FORMAT = "weightzoo-incontext"


@dataclass
class InContextConfig:
    """Everything that defines an in-context training run (unknown keys are rejected by from_dict)."""

    sources: list[str] = field(default_factory=lambda: ["synth", "phantom"])
    weights: list[float] | None = None  # per entry of `sources` (synth counts once); None = equal
    features: list[int] = field(default_factory=lambda: [16, 24, 32, 32])
    size: int = 64
    warm_size: int | None = None  # progressive resizing: the first warm_fraction of steps at this size
    warm_fraction: float = 0.0
    set_blocks: bool = True
    candidates: int = 3
    single_fraction: float = 0.5
    support_min: int = 1
    support_max: int = 8
    tasks_per_batch: int = 4
    steps: int = 3000
    lr: float = 2e-3
    weight_decay: float = 0.0
    warmup: int = 100
    grad_clip: float = 1.0
    augment: float = 1.0
    seed: int = 0
    device: str = "auto"
    log_every: int = 50
    checkpoint_every: int = 100
    val_tasks: int = 24
    val_support: int = 8
    init: str | None = None  # fine-tune: start from this model folder ("shipped": the installed weights)

    def __post_init__(self) -> None:
        if isinstance(self.sources, str):
            self.sources = [s.strip() for s in self.sources.split(",") if s.strip()]
        checks = [
            (bool(self.sources), "sources must not be empty"),
            (self.weights is None or len(self.weights) == len(self.sources), "one weight per source"),
            (len(self.features) >= 1 and min(self.features) >= 1, "features must be positive"),
            (self.size % 2 ** (len(self.features) - 1) == 0, "size must be divisible by 2^(levels-1)"),
            (self.candidates >= 1, "candidates must be >= 1"),
            (0.0 <= self.single_fraction <= 1.0, "single_fraction must be in [0, 1]"),
            (1 <= self.support_min <= self.support_max, "need 1 <= support_min <= support_max"),
            (self.steps >= 1 and self.tasks_per_batch >= 1, "steps and tasks_per_batch must be >= 1"),
            (self.lr > 0 and self.log_every >= 1 and self.checkpoint_every >= 1, "lr, log/checkpoint > 0"),
            (0.0 <= self.augment <= 1.0, "augment must be in [0, 1]"),
            (0.0 <= self.warm_fraction < 1.0, "warm_fraction must be in [0, 1)"),
            (
                self.warm_size is None or self.warm_size % 2 ** (len(self.features) - 1) == 0,
                "warm_size must be divisible by 2^(levels-1)",
            ),
        ]
        for ok, what in checks:
            if not ok:
                raise InputError(f"in-context config: {what}", "fix the value")

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> InContextConfig:
        """'tiny' (tests: seconds on a CPU), 'cpu' (the base of the shipped model), 'cpu-ft' (the shipped
        model: `cpu`'s weights fine-tuned at 128 px with thin-structure tasks), 'cpu-v1' (the first
        shipped model's recipe: 64 px, synthetic + phantom tasks), 'gpu' (not run yet)."""
        cpu: dict[str, Any] = dict(
            sources=["synth", "real-texture", "real", "phantom"],
            weights=[0.15, 0.25, 0.5, 0.1],
            features=[16, 32, 64, 96],
            size=128,
            warm_size=64,
            warm_fraction=0.85,
            support_max=10,
            steps=2400,
            lr=1e-3,
            warmup=100,
            log_every=100,
            checkpoint_every=100,
            val_tasks=16,
        )
        presets: dict[str, dict[str, Any]] = {
            "tiny": dict(
                sources=["synth"],
                features=[8, 8],
                size=32,
                candidates=2,
                support_max=4,
                tasks_per_batch=2,
                steps=20,
                warmup=2,
                log_every=5,
                checkpoint_every=5,
                val_tasks=4,
                val_support=3,
            ),
            "cpu": cpu,
            "cpu-ft": {  # the shipped model: `cpu`'s output fine-tuned at 128 px with thin structures
                **cpu,
                "sources": [*cpu["sources"], "curves", "real-texture-curves"],
                "weights": [0.12, 0.2, 0.43, 0.08, 0.07, 0.1],
                "warm_size": None,
                "warm_fraction": 0.0,
                "support_max": 16,
                "steps": 1000,
                "lr": 3e-4,
                "warmup": 25,
                "log_every": 50,
                "checkpoint_every": 25,
                "init": "shipped",
            },
            "cpu-v1": dict(features=[8, 16, 24, 32], steps=2000, warmup=50, val_tasks=16),
            "gpu": {  # not run yet (no GPU lent); sized for ~10 min on one large GPU, unmeasured
                **cpu,
                "warm_size": None,
                "warm_fraction": 0.0,
                "support_max": 16,
                "tasks_per_batch": 16,
                "steps": 6000,
                "lr": 2e-3,
                "warmup": 200,
                "log_every": 250,
                "checkpoint_every": 500,
                "val_tasks": 64,
            },
        }
        if name not in presets:
            from weightzoo.errors import UnknownNameError

            raise UnknownNameError("in-context preset", name, list(presets))
        return cls.from_dict({**presets[name], **overrides})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str | Path | None = None) -> InContextConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise InputError(f"unknown in-context config key(s) {unknown}", f"known: {sorted(known)}", source)
        return cls(**d)

    def spec(self) -> InContextSpec:
        return InContextSpec(tuple(self.features), self.size, self.set_blocks)

    def identity(self) -> dict[str, Any]:
        d = self.to_dict()
        for k in ("device", "log_every", "checkpoint_every"):
            d.pop(k)
        return d


def _gen(seed: int, step: int, stream: int) -> torch.Generator:
    s = int(np.random.SeedSequence([seed, step, stream]).generate_state(1, np.uint64)[0])
    return torch.Generator().manual_seed(s)


def lr_at(cfg: InContextConfig, step: int) -> float:
    """Linear warm-up, then cosine decay to 5 % of lr."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t)))


def sampler_for(cfg: InContextConfig, cache: Path, split: str = "train") -> TaskSampler:
    sources: list[TaskSource] = []
    weights: list[float] = []
    for i, name in enumerate(cfg.sources):
        got = build_sources([name], cfg.size, cache, split=split)
        w = cfg.weights[i] if cfg.weights is not None else 1.0
        shares = [float(getattr(src, "share", 1.0)) for src in got]  # e.g. real: sqrt(tasks) per dataset
        sources += got
        weights += [w * sh / sum(shares) for sh in shares]
    return TaskSampler(sources, weights, cfg.augment)


def _resize_tasks(x: torch.Tensor, y: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Task batch x, y [B, N, H, W] -> [B, N, size, size] (images antialiased, labels area + >= 0.5)."""
    import torch.nn.functional as F

    xs = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    ys = F.interpolate(y, size=(size, size), mode="area") >= 0.5
    return xs.clamp(0, 1), ys.float()


def split_batch(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Task batch x, y [B, S+1, H, W] -> query [B, 1, H, W], support [B, S, 2, H, W], target [B, H, W]."""
    return x[:, -1:], torch.stack([x[:, :-1], y[:, :-1]], dim=2), y[:, -1]


def validate(
    net: InContextNet, val: tuple[torch.Tensor, torch.Tensor], cfg: InContextConfig, device: torch.device
) -> dict[str, float]:
    """Mean Dice on the fixed validation tasks: one candidate, and the best of `candidates`."""
    q, s, t = split_batch(*val)
    g = torch.Generator().manual_seed(cfg.seed + 7)
    net.eval()
    with torch.no_grad():
        one = net(q.to(device), s.to(device), 1, generator=g).cpu() > 0
        many = net(q.to(device), s.to(device), cfg.candidates, generator=g).cpu() > 0
    net.train()

    def dice(p: torch.Tensor) -> torch.Tensor:  # p [B, K, H, W] -> [B, K]
        tt = t[:, None].bool()
        inter = (p & tt).sum((-2, -1)).float()
        tot = (p.sum((-2, -1)) + tt.sum((-2, -1))).float()
        return torch.where(tot > 0, 2 * inter / tot.clamp_min(1), torch.ones_like(tot))

    return {"val_dice": float(dice(one).mean()), "val_best_dice": float(dice(many).max(1).values.mean())}


def _identity(cfg: InContextConfig) -> dict[str, Any]:
    return json.loads(json.dumps(cfg.identity()))


def train_incontext(
    cfg: InContextConfig,
    out_dir: str | Path,
    cache: str | Path | None = None,
    resume: bool = True,
    stop_after: int | None = None,
    log: Callable[[str], None] | None = print,
    command: str = "",
) -> dict[str, Any]:
    """Train (or resume) a run into `out_dir`; returns the config.json dict. See the module docstring.

    cache: folder for generated data (phantoms); default out_dir/cache.
    stop_after: stop as if killed after this many steps (tests of resuming).
    """
    from safetensors.torch import save_file

    from weightzoo.segmenter import resolve_device

    out = Path(out_dir)
    dp, device = DataParallel.start(None, resolve_device(cfg.device), "in-context", local_sgd=False)
    if dp.is_writer:
        out.mkdir(parents=True, exist_ok=True)
    if (out / CONFIG_JSON).exists() and not (out / CKPT_JSON).exists():
        raise ModelError("the folder already holds a finished in-context model", "use another --out", out)
    cache = Path(cache) if cache is not None else out / "cache"
    torch.manual_seed(cfg.seed)
    net = InContextNet(cfg.spec()).to(device)
    init = _load_init(net, cfg.init) if cfg.init else None
    wrapped = dp.wrap(net, static_graph=False)  # before restoring: DDP broadcasts rank 0's weights
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    start, history, seconds_before = 0, [], 0.0
    loss_sum, loss_n = 0.0, 0
    if resume and (out / CKPT_JSON).exists():
        meta = read_json(out / CKPT_JSON, "checkpoint")
        if meta.get("identity") != _identity(cfg):
            raise ModelError(
                "the folder holds a checkpoint of another configuration", "use another --out", out
            )
        state = torch.load(out / CKPT_PT, map_location=device, weights_only=True)
        net.load_state_dict(state["net"])
        opt.load_state_dict(state["opt"])
        start, history, seconds_before = int(meta["step"]), list(meta["history"]), float(meta["seconds"])
        loss_sum, loss_n = float(meta["loss_sum"]), int(meta["loss_n"])
    sampler = sampler_for(cfg, cache)
    val = sampler.sample(cfg.val_tasks, cfg.val_support + 1, _gen(cfg.seed, 0, 99))[:2]
    t0 = time.perf_counter()
    if log and start:
        log(f"resuming at step {start}")

    def seconds() -> float:
        return seconds_before + time.perf_counter() - t0

    def write_log() -> None:
        atomic_write_json(out / LOG_JSON, {"config": cfg.to_dict(), "history": history})
        lines = [json.dumps(h) for h in history]
        atomic_write_bytes(out / LOG_TXT, ("\n".join(lines) + "\n").encode())

    net.train()
    for step in range(start, cfg.steps):
        g = _gen(cfg.seed, step, 0)
        s_n = int(torch.randint(cfg.support_min, cfg.support_max + 1, (), generator=g))
        k = 1 if bool(torch.rand((), generator=g) < cfg.single_fraction) else cfg.candidates
        x, y, _ = sampler.sample(cfg.tasks_per_batch, s_n + 1, g)
        rows = dp.rows(cfg.tasks_per_batch)  # torchrun: this rank's tasks of the global batch
        x, y = (x, y) if rows is None else (x[rows], y[rows])
        if cfg.warm_size is not None and step < cfg.warm_fraction * cfg.steps:
            x, y = _resize_tasks(x, y, cfg.warm_size)
        q, s, t = split_batch(x, y)
        for group in opt.param_groups:
            group["lr"] = lr_at(cfg, step)
        loss = best_candidate_loss(wrapped(q.to(device), s.to(device), k, generator=g), t.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
        opt.step()
        loss_sum, loss_n = loss_sum + loss.item(), loss_n + 1
        done = step + 1
        if (done % cfg.log_every == 0 or done == cfg.steps) and dp.is_writer:
            entry = {"step": done, "train_loss": round(loss_sum / loss_n, 5), "lr": lr_at(cfg, step)}
            entry.update({k_: round(v, 4) for k_, v in validate(net, val, cfg, device).items()})
            entry["seconds"] = round(seconds(), 1)
            history.append(entry)
            loss_sum, loss_n = 0.0, 0
            write_log()
            if log:
                log(
                    f"step {done}/{cfg.steps} loss {entry['train_loss']:.4f} val Dice {entry['val_dice']:.3f} "
                    f"best-of-{cfg.candidates} {entry['val_best_dice']:.3f} ({entry['seconds']:.0f} s)"
                )
        if (
            (done % cfg.checkpoint_every == 0 and done < cfg.steps)
            or (stop_after is not None and done >= stop_after)
        ) and dp.is_writer:
            torch.save({"net": net.state_dict(), "opt": opt.state_dict()}, out / CKPT_PT)
            atomic_write_json(
                out / CKPT_JSON,
                {
                    "step": done,
                    "identity": _identity(cfg),
                    "history": history,
                    "seconds": seconds(),
                    "loss_sum": loss_sum,
                    "loss_n": loss_n,
                },
            )
        if stop_after is not None and done >= stop_after and done < cfg.steps:
            return {"finished": False, "step": done}
    meta = {
        "format": FORMAT,
        "version": 1,
        "spec": cfg.spec().to_dict(),
        "train": cfg.to_dict(),
        "steps": cfg.steps,
        "seconds": round(seconds(), 1),
        "n_params": count_parameters(net),
        "device": _device_line(device),
        "torch": torch.__version__,
        "command": command,
        "final": history[-1] if history else {},
        "init": init,
        "finished": True,
        **dp.summary(),
    }
    if dp.is_writer:  # under torchrun, rank 0 alone writes
        save_file(
            {k_: v.detach().cpu().contiguous() for k_, v in net.state_dict().items()}, str(out / WEIGHTS)
        )
        atomic_write_json(out / CONFIG_JSON, meta)
        write_log()
        for name in (CKPT_PT, CKPT_JSON):
            (out / name).unlink(missing_ok=True)
    dp.barrier()
    return meta


def _load_init(net: InContextNet, init: str) -> dict[str, Any]:
    """Fine-tuning: copy the weights of model folder `init` ('shipped': the installed ones) into `net`;
    returns what identifies them (folder, sha256 of the weights, its steps and command)."""
    import hashlib

    folder = shipped_weights_dir() if init == "shipped" else Path(init)
    base = load_incontext_model(folder, "cpu")
    if base.spec != net.spec:
        raise InputError(
            f"the init model's network {base.spec.to_dict()} differs from this config's {net.spec.to_dict()}",
            "use the same features and size as the init model",
            folder,
        )
    net.load_state_dict(base.state_dict())
    meta = base.meta  # type: ignore[attr-defined]
    sha = hashlib.sha256((folder / WEIGHTS).read_bytes()).hexdigest()
    return {"folder": str(folder), "sha256": sha, "steps": meta.get("steps"), "command": meta.get("command")}


def _device_line(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def load_incontext_model(folder: str | Path | None = None, device: str = "auto") -> InContextNet:
    """Load a model folder (config.json + model.safetensors); None = the shipped pretrained model."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from weightzoo.segmenter import resolve_device

    folder = Path(folder) if folder is not None else shipped_weights_dir()
    if not (folder / CONFIG_JSON).exists():
        raise ModelError(
            "not an in-context model folder (no config.json)",
            "give a folder written by `weightzoo incontext train`",
            folder,
        )
    meta = read_json(folder / CONFIG_JSON, "in-context config.json")
    if meta.get("format") != FORMAT:
        raise ModelError(f"config.json has format {meta.get('format')!r}, not {FORMAT!r}", "", folder)
    spec = InContextSpec.from_dict(meta.get("spec", {}))
    try:
        state = load_file(str(folder / WEIGHTS))
    except (SafetensorError, OSError, FileNotFoundError) as e:
        raise ModelError(
            f"cannot read the weights ({e})", "re-train or re-install", folder / WEIGHTS
        ) from None
    net = InContextNet(spec)
    try:
        net.load_state_dict(state)
    except RuntimeError as e:
        raise ModelError(
            f"weights do not fit the spec ({str(e).splitlines()[0]})", "re-train", folder / WEIGHTS
        ) from None
    if any(not torch.isfinite(v).all() for v in state.values()):
        raise ModelError("weights contain NaN/inf", "re-train the model", folder / WEIGHTS)
    net.meta = meta  # type: ignore[attr-defined]
    return net.to(resolve_device(device)).eval()


def shipped_weights_dir() -> Path:
    return Path(__file__).resolve().parent / "weights"
