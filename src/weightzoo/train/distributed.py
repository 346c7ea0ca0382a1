"""Training beyond one process: torch.distributed launched by torchrun, for every route's loop.

Contract (what a training loop does with a `DataParallel`, `dp`):

    dp = DataParallel.start(options, device)      # joins torchrun's process group (gloo CPU, nccl GPU)
    ddp_net = dp.wrap(net)                        # DistributedDataParallel; before restoring a checkpoint
    rows = dp.rows(B)                             # this rank's rows of the step's global batch [B / N]
    loss_fn = dp.loss(step, DiceBCELoss())        # global batch Dice in synchronous steps (see losses.py)
    model = dp.model(step, net, ddp_net)          # forward through DDP only where gradients are all-reduced
    ... forward, backward, optimizer.step() ...
    dp.after_step(done, steps, lr, net, optimizer)# post-local SGD: average (+ SlowMo) when due
    extra = dp.checkpoint_extra(net, optimizer)   # every rank calls it; rank 0 gets all ranks' states
    if dp.is_writer: save_checkpoint(..., extra)

Without torchrun (or with world size 1 and no options) `dp.active` is False and every call is the
identity, so a plain run is exactly as before.

Synchronous DDP (`--ddp`): every rank draws the same global batch from (seed, step), takes rows
r, r+N, ... of it, and DDP averages the gradients. nnU-Net's loss uses batch Dice, so the Dice terms
are summed over ranks first (`GlobalBatchDiceBCE`). N processes therefore give one process's result on
the global batch, to float tolerance (tested).

Post-local SGD (`--local-sgd H`, Lin et al. 2020): `warmup_sync` synchronous steps, then each rank
steps alone and the parameters are averaged every H steps and after the last step
(torch's `average_parameters_or_parameter_groups`). The schedule is a pure function of the step, so a
checkpoint needs no averager state (torch #78988). Between averages the ranks differ: a checkpoint
then holds every rank's weights and optimizer state (gathered to rank 0, which alone writes files).

SlowMo (`--slowmo β --slowmo-lr α`, Wang et al. 2020), at each average, with x₀ the weights after the
previous one and γ the current inner learning rate:

    u ← β·u + (x₀ − mean_r x_r) / γ        x ← x₀ − α·γ·u

β = 0, α = 1 is plain averaging. `average_optimizer` also averages momentum buffers / Adam moments.

Communication is counted (bytes and calls per collective) and turned into time with a ring all-reduce
model: 2(N−1)/N · bytes / bandwidth + 2(N−1) · latency per call (`CommCounter.modelled_seconds`).
"""

from __future__ import annotations

import atexit
import contextlib
import contextvars
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from weightzoo.errors import InputError

SPLITS = ("batch", "site", "subject")  # how ranks share the data: rows of one global batch, or shards


@dataclass(frozen=True)
class DistOptions:
    """How ranks train together. All defaults: one process, exactly as without this module."""

    ddp: bool = False  # synchronous data parallel
    local_sgd: int = 0  # H: local steps between averages (0 = synchronous all the way)
    warmup_sync: int = 0  # synchronous steps before local SGD starts
    slowmo: float = 0.0  # β, outer momentum
    slowmo_lr: float = 1.0  # α, outer learning rate
    average_optimizer: bool = False  # average optimizer state at each average too
    split: str = "batch"  # batch: rows of one global batch; site / subject: each rank its own shard

    def __post_init__(self) -> None:
        if self.local_sgd < 0 or self.warmup_sync < 0:
            raise InputError("--local-sgd and --warmup-sync must be ≥ 0", "give a number of steps")
        if not 0 <= self.slowmo < 1 or self.slowmo_lr <= 0:
            raise InputError("--slowmo must be in [0, 1) and --slowmo-lr > 0", "SlowMo uses β≈0.5, α=1")
        if self.split not in SPLITS:
            raise InputError(f"unknown --split '{self.split}'", f"choose one of: {', '.join(SPLITS)}")
        if (self.slowmo or self.slowmo_lr != 1.0 or self.average_optimizer) and not self.local_sgd:
            raise InputError(
                "--slowmo, --slowmo-lr and --average-optimizer act at averages", "add --local-sgd H"
            )

    @property
    def requested(self) -> bool:
        return self.ddp or self.local_sgd > 0

    @property
    def uses_slowmo(self) -> bool:
        return self.slowmo != 0.0 or self.slowmo_lr != 1.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class DistContext:
    """torchrun's environment: RANK, WORLD_SIZE, LOCAL_RANK (MASTER_ADDR/PORT for the rendezvous)."""

    rank: int
    world_size: int
    local_rank: int

    @classmethod
    def from_env(cls) -> DistContext | None:
        if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
            return None
        try:
            return cls(
                int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
            )
        except ValueError:
            raise InputError("RANK / WORLD_SIZE are not integers", "launch with torchrun") from None


_OPTIONS: contextvars.ContextVar[DistOptions | None] = contextvars.ContextVar("weightzoo_dist", default=None)


@contextlib.contextmanager
def launch_options(options: DistOptions | None) -> Iterator[None]:
    """The data-parallel options every training loop started inside picks up (set by the CLI, so
    the routes' functions need no extra argument)."""
    token = _OPTIONS.set(options)
    try:
        yield
    finally:
        _OPTIONS.reset(token)


def current_options() -> DistOptions:
    return _OPTIONS.get() or DistOptions()


def _group_active() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_writer() -> bool:
    """True except on torchrun ranks other than 0: only rank 0 writes files."""
    import torch.distributed as dist

    return not _group_active() or dist.get_rank() == 0


def barrier() -> None:
    """Wait for every rank (e.g. until rank 0 has written what all will read); no-op in one process."""
    import torch.distributed as dist

    if _group_active():
        dist.barrier()


def check_launch(options: DistOptions) -> None:
    """One line, exit 2, before any work: several torchrun ranks without --ddp would all train the
    same run and race on its files."""
    ctx = DistContext.from_env()
    if ctx is not None and ctx.world_size > 1 and not options.requested:
        raise InputError(
            f"launched as {ctx.world_size} torchrun processes without --ddp or --local-sgd",
            "add --ddp (synchronous) or --local-sgd H, or run without torchrun",
        )


def shard_cases(cases: list[str], group_of: Any, options: DistOptions | None) -> list[str]:
    """This rank's training cases when each rank holds its own data (--split site | subject):
    groups (sites or subjects, sorted) r, r+N, ... of the N ranks. Other splits: all `cases`."""
    ctx = DistContext.from_env()
    if (
        options is None
        or not options.requested
        or ctx is None
        or ctx.world_size < 2
        or options.split == "batch"
    ):
        return cases
    groups = sorted({group_of(c) for c in cases})
    if len(groups) < ctx.world_size:
        raise InputError(
            f"--split {options.split}: {len(groups)} {options.split}s for {ctx.world_size} processes",
            f"use at most {len(groups)} processes, or --split batch",
        )
    mine = set(groups[ctx.rank :: ctx.world_size])
    return [c for c in cases if group_of(c) in mine]


@dataclass
class CommCounter:
    """Collectives issued by this rank: calls and payload bytes, by kind."""

    calls: dict[str, int] = field(default_factory=dict)
    bytes: dict[str, int] = field(default_factory=dict)

    def add(self, kind: str, tensor: torch.Tensor) -> None:
        self.add_bytes(kind, tensor.numel() * tensor.element_size())

    def add_bytes(self, kind: str, n_bytes: int, calls: int = 1) -> None:
        self.calls[kind] = self.calls.get(kind, 0) + calls
        self.bytes[kind] = self.bytes.get(kind, 0) + n_bytes

    def modelled_seconds(self, world_size: int, gbit_per_s: float, latency_s: float = 50e-6) -> float:
        """Ring all-reduce time of every counted call on a network of `gbit_per_s` (bandwidth-optimal
        ring: each rank sends and receives 2(N−1)/N of the payload in 2(N−1) latency-bound rounds)."""
        if world_size < 2:
            return 0.0
        n = world_size
        payload = sum(self.bytes.values()) * 2 * (n - 1) / n
        return payload * 8 / (gbit_per_s * 1e9) + sum(self.calls.values()) * 2 * (n - 1) * latency_s

    def summary(self, world_size: int) -> dict[str, Any]:
        return {
            "calls": dict(self.calls),
            "bytes": dict(self.bytes),
            "total_bytes": sum(self.bytes.values()),
            "modelled_seconds_1gbit": round(self.modelled_seconds(world_size, 1.0), 4),
            "modelled_seconds_10gbit": round(self.modelled_seconds(world_size, 10.0), 4),
        }


def _init_group(ctx: DistContext, device: torch.device) -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        return
    # nccl needs a GPU of its own per rank; ranks that share a GPU (or run on the CPU) use gloo, which
    # all-reduces CUDA tensors too, more slowly
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", ctx.world_size))  # torchrun sets it
    own_gpu = device.type == "cuda" and torch.cuda.device_count() >= per_node
    dist.init_process_group("nccl" if own_gpu else "gloo")
    atexit.register(lambda: dist.is_initialized() and dist.destroy_process_group())


class DataParallel:
    """One rank's part in a data-parallel run (see the module docstring for the loop's contract)."""

    def __init__(self, options: DistOptions, ctx: DistContext | None):
        self.options = options
        self.rank = ctx.rank if ctx else 0
        self.world_size = ctx.world_size if ctx else 1
        self.local_rank = ctx.local_rank if ctx else 0
        self.active = options.requested and self.world_size > 1
        self.comm = CommCounter()
        self.anchor: list[torch.Tensor] = []  # SlowMo: weights after the previous average
        self.momentum: list[torch.Tensor] = []  # SlowMo: outer momentum u

    # ---- setup ------------------------------------------------------------------------------------
    @classmethod
    def start(
        cls, options: DistOptions | None, device: torch.device, route: str = "", local_sgd: bool = True
    ) -> tuple[DataParallel, torch.device]:
        """Join torchrun's process group when launched by it; returns this rank's device (cuda:LOCAL_RANK).

        options: None = the ones set by `launch_options` (plain training if none). local_sgd=False:
        `route` averages gradients only (synchronous DDP), and other options are refused."""
        options = options or current_options()
        check_launch(options)
        if not local_sgd and (options.local_sgd or options.split != "batch"):
            raise InputError(
                f"the {route} route trains with synchronous DDP only",
                "use --ddp without --local-sgd / --split",
            )
        dp = cls(options, DistContext.from_env() if options.requested else None)
        if not dp.active:
            return dp, device
        if device.type == "cuda":
            device = torch.device("cuda", dp.local_rank % torch.cuda.device_count())
            torch.cuda.set_device(device)
        _init_group(DistContext(dp.rank, dp.world_size, dp.local_rank), device)
        return dp, device

    @property
    def is_writer(self) -> bool:
        return self.rank == 0

    def identity(self) -> dict[str, Any]:
        """`{"distributed": set-up}` for a run identity; {} for a plain run, whose identity stays as before."""
        if not self.options.requested:
            return {}
        return {"distributed": {"world_size": self.world_size, **self.options.to_dict()}}

    def seed(self, seed: int) -> int:
        """This rank's seed for streams that differ per rank (rank 0: the run's seed itself)."""
        if self.rank == 0:
            return seed
        return int(np.random.SeedSequence([seed, self.rank, 0xD1]).generate_state(1, np.uint32)[0])

    def wrap(self, net: nn.Module, static_graph: bool = True) -> nn.Module:
        """`net` in DistributedDataParallel with a counting all-reduce hook (`net` itself if inactive).
        Call it before restoring a checkpoint: DDP broadcasts rank 0's weights when it is built.

        static_graph: the same parameters take part in every step (PlainConvUNet without deep
        supervision never uses its coarser seg layers: DDP must know); False for models whose used
        parameters change from batch to batch (heads picked by site), at a graph traversal per step."""
        if not self.active:
            return net
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        # DDP broadcasts rank 0's parameters once, coalesced: one call of the model's bytes
        self.comm.add_bytes("broadcast", sum(p.numel() * p.element_size() for p in net.parameters()))
        dev = next(net.parameters()).device
        ddp = nn.parallel.DistributedDataParallel(
            net,
            device_ids=[dev] if dev.type == "cuda" else None,
            static_graph=static_graph,
            find_unused_parameters=not static_graph,
        )
        counter = self.comm

        def hook(state, bucket):  # type: ignore[no-untyped-def]  # DDP rejects annotations other than its own
            counter.add("gradients", bucket.buffer())
            return default_hooks.allreduce_hook(state, bucket)

        ddp.register_comm_hook(None, hook)
        return ddp

    # ---- per step ---------------------------------------------------------------------------------
    def synchronous(self, step: int) -> bool:
        """Are step's gradients all-reduced? (0-based step)"""
        return self.active and (self.options.local_sgd == 0 or step < self.options.warmup_sync)

    def rows(self, batch_size: int) -> torch.Tensor | None:
        """This rank's rows of a global batch (r, r+N, ...: every rank gets a mix of nnU-Net's random
        and foreground-oversampled rows); None when inactive."""
        if not self.active:
            return None
        if batch_size % self.world_size:
            raise InputError(
                f"batch size {batch_size} is not a multiple of the {self.world_size} processes",
                f"use --batch-size {max(self.world_size, batch_size - batch_size % self.world_size)}",
            )
        return torch.arange(self.rank, batch_size, self.world_size)

    def batch_plan(self, batch_size: int, seed: int) -> tuple[int, int, torch.Tensor | None]:
        """(rows to draw, seed to draw them from, this rank's rows of them or None).

        split batch: every rank draws the global batch from the run's seed and keeps its rows;
        split site/subject: each rank draws B/N rows of its own shard from its own seed."""
        rows = self.rows(batch_size)
        if rows is None or self.options.split == "batch":
            return batch_size, seed, rows
        return batch_size // self.world_size, self.seed(seed), None

    def common_hash(self, own: str) -> str:
        """A data fingerprint every rank agrees on: with sharded data, the hash of all ranks' hashes."""
        if not self.active or self.options.split == "batch":
            return own
        import hashlib

        import torch.distributed as dist

        hashes: list[Any] = [None] * self.world_size
        dist.all_gather_object(hashes, own)
        return hashlib.sha256(" ".join(hashes).encode()).hexdigest()[:16]

    def take_rows(self, batch: dict[str, Any], batch_size: int) -> dict[str, Any]:
        """This rank's rows of a dict batch (every tensor whose first dimension is the batch)."""
        rows = self.rows(batch_size)
        if rows is None:
            return batch
        return {
            k: v[rows.to(v.device)] if torch.is_tensor(v) and v.dim() > 0 and len(v) == batch_size else v
            for k, v in batch.items()
        }

    def model(self, step: int, net: nn.Module, wrapped: nn.Module) -> nn.Module:
        """The module to run forward/backward through: DDP in synchronous steps, the bare net in local ones."""
        return wrapped if self.synchronous(step) else net

    def loss(self, step: int, loss_fn: nn.Module) -> nn.Module:
        """nnU-Net's batch-Dice loss over the global batch in synchronous steps; the rank's own batch otherwise."""
        if not self.synchronous(step):
            return loss_fn
        from weightzoo.train.losses import GlobalBatchDiceBCE

        return GlobalBatchDiceBCE(loss_fn, self)

    def all_reduce_sum(self, t: torch.Tensor, kind: str) -> torch.Tensor:
        import torch.distributed as dist

        self.comm.add(kind, t)
        dist.all_reduce(t)
        return t

    def averages_at(self, done: int, steps: int) -> bool:
        """Are parameters averaged after step `done` (1-based)? Post-local SGD's schedule, stateless."""
        h, w = self.options.local_sgd, self.options.warmup_sync
        return self.active and h > 0 and done > w and ((done - w) % h == 0 or done == steps)

    def after_step(
        self, done: int, steps: int, lr: float, net: nn.Module, optimizer: torch.optim.Optimizer
    ) -> bool:
        """Average (and apply SlowMo) when due; returns whether it averaged."""
        if not self.active or not self.options.local_sgd:
            return False
        params = [p for p in net.parameters() if p.requires_grad]
        if done == self.options.warmup_sync:  # the last synchronous step: x₀ for SlowMo
            self.begin(net)
        if not self.averages_at(done, steps):
            return False
        from torch.distributed.algorithms.model_averaging.utils import average_parameters_or_parameter_groups

        self.comm.add_bytes("parameters", sum(p.numel() * p.element_size() for p in params))
        average_parameters_or_parameter_groups(params, None)  # one flat all-reduce, torch's averager
        if self.options.uses_slowmo:
            beta, alpha = self.options.slowmo, self.options.slowmo_lr
            with torch.no_grad():
                for p, x0, u in zip(params, self.anchor, self.momentum, strict=True):
                    u.mul_(beta).add_((x0 - p) / lr)
                    p.copy_(x0 - alpha * lr * u)
                    x0.copy_(p)
        if self.options.average_optimizer:
            self._average_optimizer(optimizer)
        return True

    def ready(self, net: nn.Module, start: int) -> None:
        """After building (and maybe restoring) the net, before the first step of this call."""
        if start == 0 and self.options.warmup_sync == 0:
            self.begin(net)

    def begin(self, net: nn.Module) -> None:
        """Set SlowMo's x₀ to the current (common) weights: before step 1 of a fresh run without
        warm-up (DDP has broadcast rank 0's initial weights), else after the last synchronous step."""
        if self.active and self.options.uses_slowmo:
            params = [p for p in net.parameters() if p.requires_grad]
            self.anchor = [p.detach().clone() for p in params]
            self.momentum = [torch.zeros_like(p) for p in params]

    def _average_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        states = [
            v
            for s in optimizer.state.values()
            for v in s.values()
            if torch.is_tensor(v) and v.is_floating_point() and v.dim() > 0
        ]
        if not states:
            return
        flat = torch.cat([v.reshape(-1) for v in states]) / self.world_size
        self.all_reduce_sum(flat, "optimizer")
        offset = 0
        for v in states:
            v.copy_(flat[offset : offset + v.numel()].view_as(v))
            offset += v.numel()

    # ---- checkpoints ------------------------------------------------------------------------------
    def ranks_differ(self) -> bool:
        return self.active and self.options.local_sgd > 0

    def checkpoint_extra(self, net: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
        """Tensors a checkpoint needs beyond rank 0's own: SlowMo's buffers and, when ranks can differ,
        every other rank's weights and optimizer state (`rank<r>/...`). Every rank must call it."""
        extra: dict[str, torch.Tensor] = {}
        for i, (x0, u) in enumerate(zip(self.anchor, self.momentum, strict=True)):
            extra[f"slowmo.anchor.{i}"] = x0.detach().cpu().contiguous()
            extra[f"slowmo.momentum.{i}"] = u.detach().cpu().contiguous()
        if not self.ranks_differ():
            return extra
        import torch.distributed as dist

        from weightzoo.train.checkpoint import state_tensors

        mine = state_tensors(net, optimizer)
        gathered: list[Any] = [None] * self.world_size if self.rank == 0 else []
        dist.gather_object(mine, gathered if self.rank == 0 else None, dst=0)
        for r, tensors in enumerate(gathered):
            if r > 0:
                extra.update({f"rank{r}/{k}": v for k, v in tensors.items()})
        return extra

    def restore(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A checkpoint's tensors as this rank's own (its `rank<r>/` entries replace rank 0's), after
        putting SlowMo's buffers back."""
        anchors = sorted(
            (k for k in tensors if k.startswith("slowmo.anchor.")), key=lambda k: int(k.rsplit(".", 1)[1])
        )
        if anchors:
            self.anchor = [tensors[k].clone() for k in anchors]
            self.momentum = [tensors[k.replace("anchor", "momentum")].clone() for k in anchors]
        if self.rank == 0 or not self.ranks_differ():
            return tensors
        prefix = f"rank{self.rank}/"
        own = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        if not own:
            raise InputError(
                f"the checkpoint holds no state for rank {self.rank}",
                "resume with the same number of processes as the interrupted run",
            )
        return {
            **{k: v for k, v in tensors.items() if "/" not in k and not k.startswith(("model.", "optim."))},
            **own,
        }

    def to_device(self, device: torch.device) -> None:
        self.anchor = [t.to(device) for t in self.anchor]
        self.momentum = [t.to(device) for t in self.momentum]

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist

            dist.barrier()

    def summary(self) -> dict[str, Any]:
        """`{"distributed": set-up + this rank's counted communication}` for a result's info; {} for a plain run."""
        if not self.options.requested:
            return {}
        return {
            "distributed": {
                **self.identity()["distributed"],
                "communication": self.comm.summary(self.world_size),
            }
        }
