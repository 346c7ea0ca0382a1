"""Many runs of one ArchSpec trained together: stacked parameters, one grouped forward/backward per step.

Each run keeps its own seed (initialisation, batch indices, augmentation: `weightzoo.zoo.runs.draw_batch`,
the same draws as training it alone), its own data (sites, tasks), learning rate, weight decay and
gradient clipping. The step is nnU-Net's recipe written for stacked tensors:

  logits[m] = net(params[m], x[m])                      (weightzoo.zoo.grouped: one grouped conv per layer
                                                         for all M; or torch.func.vmap, forward="vmap")
  loss      = M · DiceBCELoss(logits as [B, M·K, H, W])  (= Σ_m loss_m: batch Dice is per channel and BCE a
                                                          mean over equal-sized runs, so run m's gradient
                                                          is exactly the gradient of its own loss)
  clip each run's gradient to norm grad_clip, then SGD (Nesterov, momentum 0.99) or Adam per run,
  with the formulas of torch.optim (single-tensor implementation).

Equal to training alone up to float rounding (grouped vs plain convolutions, fused vs unfused
multiply-adds): the test bounds the difference after 10 steps. Requirements of a batch: one ArchSpec,
batch size, step count and optimizer; no dropout (its masks come from the global RNG per run).

Checkpoints due at the same step are scored together (`evaluate_stacked`: one grouped forward over the
runs' evaluation slices, then the same `checkpoint_scores` as a run trained alone).

`choose_mode` picks batched or sequential per device: on CUDA batched; on the CPU it times both on the
actual architecture (a few steps each) and takes batched only if it is clearly faster, so the automatic
choice is never the slower one.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch.func import functional_call, vmap

from weightzoo.errors import InputError
from weightzoo.nets.unet import ArchSpec, build_network
from weightzoo.train.augment import AugmentDraws, apply_augmentation
from weightzoo.train.config import TrainConfig
from weightzoo.train.loop import autocast_dtype, determinism, poly_lr
from weightzoo.train.losses import DiceBCELoss
from weightzoo.zoo.base import start_network
from weightzoo.zoo.grid import RunPlan, cached_base
from weightzoo.zoo.grouped import grouped_forward
from weightzoo.zoo.runs import (
    EVAL_BATCH,
    Phases,
    RunData,
    Sink,
    checkpoint_scores,
    draw_batch,
    eval_inputs,
    pending,
    phase_timer,
)

SGD_MOMENTUM = 0.99
ADAM_BETAS, ADAM_EPS = (0.9, 0.999), 1e-8
CALIBRATE_MIN_STEPS = 50
FORWARDS = ("grouped", "vmap")
EVAL_ELEMENTS = 2**26  # activations per grouped evaluation forward (~256 MB of float32 per layer)
_choices: dict[tuple, str] = {}  # calibration results per (device, arch, batch, size, M)


def group_key(plan: RunPlan, input_channels: int) -> tuple:
    """Runs with equal keys can share a batch."""
    c = plan.config
    return (
        plan.spec(input_channels).hash(),
        c.batch_size,
        c.steps,
        c.optimizer,
        tuple(c.size),
        c.channels_last,
        c.amp,
        plan.base,
        c.trainable,
    )


def batchable(plan: RunPlan) -> bool:
    """Dropout runs train sequentially (their masks come from the global RNG, per run), and so do
    3-D runs (patches of whole volumes; the batched trainer stacks 2-D slices)."""
    return plan.config.dropout == 0.0 and plan.config.dims == 2


@dataclass
class StackedRuns:
    """M networks of one ArchSpec as stacked parameters {name: [M, ...]} with per-run optimizer state."""

    base: torch.nn.Module
    params: dict[str, torch.Tensor]
    optimizer: str
    lr0: torch.Tensor  # [M] initial learning rates
    wd: torch.Tensor  # [M] weight decay
    clip: torch.Tensor  # [M] gradient-norm limits (0 = off)
    state: dict[str, dict[str, torch.Tensor]]
    n_updates: int = 0
    impl: str = "grouped"  # grouped | vmap (FORWARDS)
    trainable: frozenset[str] = frozenset()  # parameters that train (fine-tunes freeze the others)

    @classmethod
    def make(
        cls,
        spec: ArchSpec,
        configs: list[TrainConfig],
        device: torch.device,
        impl: str = "grouped",
        starts: list[torch.nn.Module] | None = None,
    ) -> StackedRuns:
        """Run m starts from starts[m] (its parameters with requires_grad False stay frozen), default
        build_network(spec, seed=configs[m].seed): as it would alone."""
        if impl not in FORWARDS:
            raise InputError(f"unknown batched forward '{impl}'", f"use one of {', '.join(FORWARDS)}")
        nets = starts if starts is not None else [build_network(spec, seed=c.seed) for c in configs]
        frozen = [{n for n, p in net.named_parameters() if not p.requires_grad} for net in nets]
        if any(f != frozen[0] for f in frozen):
            raise InputError("a batch mixes trainable subsets", "group runs by their `trainable` key")
        if any(True for _ in nets[0].buffers()):
            raise InputError(
                "batched training needs a network without buffers", "train these runs sequentially"
            )
        names = [n for n, _ in nets[0].named_parameters()]
        params = {
            n: torch.stack([dict(net.named_parameters())[n].detach() for net in nets]).to(device)
            for n in names
        }
        opts = {c.optimizer for c in configs}
        if len(opts) != 1:
            raise InputError(f"a batch mixes optimizers {sorted(opts)}", "group runs by optimizer")

        def vec(vals: list[float]) -> torch.Tensor:
            return torch.tensor(vals, dtype=torch.float32, device=device)

        return cls(
            base=build_network(spec).to(device).train(),
            params=params,
            optimizer=opts.pop(),
            lr0=vec([c.learning_rate for c in configs]),
            wd=vec([c.weight_decay for c in configs]),
            clip=vec([c.grad_clip for c in configs]),
            state={n: {} for n in names},
            impl=impl,
            trainable=frozenset(n for n in names if n not in frozen[0]),
        )

    @property
    def m(self) -> int:
        return len(self.lr0)

    def forward(self, x: torch.Tensor, params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """x [M, B, C, H, W] -> logits [M, B, K, H, W] (params: a subset of runs, default all)."""
        params = self.params if params is None else params
        if self.impl == "grouped":
            return grouped_forward(self.base, params, x)

        def one(p: dict[str, torch.Tensor], xx: torch.Tensor) -> torch.Tensor:
            return functional_call(self.base, p, (xx,))

        return vmap(one)(params, x)

    def run_state(self, m: int) -> dict[str, torch.Tensor]:
        return {n: t[m].detach() for n, t in self.params.items()}

    def step(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        lr: torch.Tensor,
        loss_fn: DiceBCELoss,
        amp: torch.dtype | None,
        phases: Phases | None = None,
    ) -> None:
        """One training step of all M runs: x [M, B, C, H, W], y [M, B, K, H, W], lr [M]."""
        phase = phase_timer(phases)
        with phase("forward, backward"):
            grads = self._gradients(x, y, loss_fn, amp)
        with phase("update"), torch.no_grad():
            used = {n: g for n, g in grads.items() if g is not None}
            clipped = self._clip(list(used.values()))
            self._update(dict(zip(used, clipped, strict=True)), lr)

    def _gradients(
        self, x: torch.Tensor, y: torch.Tensor, loss_fn: DiceBCELoss, amp: torch.dtype | None
    ) -> dict[str, torch.Tensor | None]:
        leaves = {n: t.requires_grad_(True) for n, t in self.params.items() if n in self.trainable}
        with torch.autocast(x.device.type, dtype=amp or torch.float32, enabled=amp is not None):
            logits = self.forward(x)
        m, b, k = logits.shape[:3]
        flat = logits.permute(1, 0, 2, 3, 4).reshape(b, m * k, *logits.shape[3:])
        target = y.permute(1, 0, 2, 3, 4).reshape(b, m * k, *y.shape[3:])
        loss = loss_fn(flat, target) * m
        # allow_unused: the seg layers of the lower decoder stages are unused without deep supervision;
        # like torch.optim (grad None) they are then not updated at all.
        grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
        for t in leaves.values():
            t.requires_grad_(False)
        return dict(zip(leaves, grads, strict=True))

    def _bcast(self, v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return v.view(-1, *([1] * (like.ndim - 1)))

    def _clip(self, grads: list[torch.Tensor]) -> list[torch.Tensor]:
        """torch.nn.utils.clip_grad_norm_ per run: scale by min(1, clip / (total norm + 1e-6))."""
        norms = torch.stack([g.flatten(1).float().norm(dim=1) for g in grads], 1)  # [M, n_params]
        total = norms.norm(dim=1)
        coef = torch.clamp(self.clip / (total + 1e-6), max=1.0)
        coef = torch.where(self.clip > 0, coef, torch.ones_like(coef))
        return [g * self._bcast(coef, g).to(g.dtype) for g in grads]

    def _update(self, grads: dict[str, torch.Tensor], lr: torch.Tensor) -> None:
        self.n_updates += 1
        for n, g in grads.items():
            p, st = self.params[n], self.state[n]
            lr_b, wd_b = self._bcast(lr, p), self._bcast(self.wd, p)
            g = g + wd_b * p
            if self.optimizer == "sgd":  # torch.optim.SGD(momentum=0.99, nesterov=True)
                buf = st.get("momentum")
                buf = g.clone() if buf is None else buf.mul_(SGD_MOMENTUM).add_(g)
                st["momentum"] = buf
                p.sub_(lr_b * (g + SGD_MOMENTUM * buf))
            else:  # torch.optim.Adam
                b1, b2 = ADAM_BETAS
                m1 = st.setdefault("exp_avg", torch.zeros_like(p)).lerp_(g, 1 - b1)
                m2 = st.setdefault("exp_avg_sq", torch.zeros_like(p)).mul_(b2).addcmul_(g, g, value=1 - b2)
                bc1, bc2 = 1 - b1**self.n_updates, 1 - b2**self.n_updates
                denom = (m2.sqrt() / bc2**0.5).add_(ADAM_EPS)
                p.sub_((lr_b / bc1) * m1 / denom)


@torch.no_grad()
def evaluate_stacked(
    runs: StackedRuns,
    which: list[int],
    datas: list[RunData],
    tasks: list[list[str]],
    loss_fn: DiceBCELoss,
    amp: torch.dtype | None,
) -> list[dict[str, Any]]:
    """`checkpoint_scores` of runs `which` (indices into runs) at their current weights; datas and
    tasks are per run of `which`. Runs with the same validation slices are scored in grouped forwards
    of as many runs as EVAL_ELEMENTS allows."""
    out: list[dict[str, Any] | None] = [None] * len(which)
    groups: dict[tuple, list[int]] = {}
    for j, d in enumerate(datas):
        groups.setdefault((id(d.val), len(d.eval_idx), tuple(tasks[j])), []).append(j)
    x0 = datas[0].x
    widest = 2 * int(runs.base.encoder.output_channels[0])  # channels at full resolution (decoder)
    per_run = EVAL_BATCH * x0.shape[-1] * x0.shape[-2] * widest
    chunk = max(1, EVAL_ELEMENTS // per_run)
    for js in groups.values():
        for c in range(0, len(js), chunk):
            part = js[c : c + chunk]
            idx = torch.tensor([which[j] for j in part], device=x0.device)
            params = {n: t.index_select(0, idx) for n, t in runs.params.items()}
            inputs = [eval_inputs(datas[j]) for j in part]

            def logits(xs: list[torch.Tensor], params: dict[str, torch.Tensor] = params) -> torch.Tensor:
                x = torch.stack(xs)  # [M', N, C, H, W] -> logits [M', N, K, H, W]
                with torch.autocast(x.device.type, dtype=amp or torch.float32, enabled=amp is not None):
                    return torch.cat(
                        [
                            runs.forward(x[:, i : i + EVAL_BATCH], params)
                            for i in range(0, x.shape[1], EVAL_BATCH)
                        ],
                        1,
                    )

            train_logits = logits([i[0] for i in inputs])
            val_logits = logits([i[2] for i in inputs]) if inputs[0][2] is not None else None
            for k, j in enumerate(part):
                _, ty, _, vy = inputs[k]
                out[j] = checkpoint_scores(
                    train_logits[k], ty, None if val_logits is None else val_logits[k], vy, tasks[j], loss_fn
                )
    return out  # type: ignore[return-value]


def train_batched(
    plans: list[RunPlan],
    datas: list[RunData],
    device: torch.device,
    sink: Sink,
    skips: Iterable[Iterable[int]] | None = None,
    on_step: Callable[[int], None] | None = None,
    phases: Phases | None = None,
    forward: str = "grouped",
) -> None:
    """Train `plans` (one group_key, no dropout) together; hand each run's planned checkpoints not in
    its `skips` entry to `sink`, in step order. on_step(n) is called with the runs advanced per step;
    `phases` times the parts; `forward`: grouped | vmap (FORWARDS)."""
    if not plans:
        return
    keys = {group_key(p, d.x.shape[1]) for p, d in zip(plans, datas, strict=True)}
    if len(keys) != 1 or not all(batchable(p) for p in plans):
        raise InputError(
            "these runs cannot be trained in one batch (different setup or dropout)",
            "train them sequentially",
        )
    skips = [set(s) for s in skips] if skips is not None else [set() for _ in plans]
    due: dict[int, list[int]] = {}  # step -> runs that save then
    for m, (p, s) in enumerate(zip(plans, skips, strict=True)):
        for step in sorted(set(p.steps) - s):
            due.setdefault(step, []).append(m)
    if not due:
        return
    last = max(due)
    phase = phase_timer(phases)
    cfg = plans[0].config
    spec = plans[0].spec(datas[0].x.shape[1])
    t0 = time.perf_counter()
    amp = autocast_dtype(cfg, device)
    loss_fn = DiceBCELoss()
    with determinism(device, cfg.deterministic):
        base = cached_base(plans[0].base_path) if plans[0].base_path else None
        starts = [start_network(spec, p.config.seed, base, p.tasks, p.config.trainable) for p in plans]
        runs = StackedRuns.make(spec, [p.config for p in plans], device, forward, starts)

        def save_now(step: int) -> None:
            which = due.get(step, [])
            if not which:
                return
            with phase("evaluate"):
                evs = evaluate_stacked(
                    runs,
                    which,
                    [datas[m] for m in which],
                    [list(plans[m].tasks) for m in which],
                    loss_fn,
                    amp,
                )
            with phase("commit"):
                for m, ev in zip(which, evs, strict=True):
                    sink(pending(plans[m], step, runs.run_state(m), ev, time.perf_counter() - t0, "batched"))

        save_now(0)
        for step in range(last):
            lr = torch.tensor(
                [poly_lr(p.config.learning_rate, step, cfg.steps) for p in plans],
                dtype=torch.float32,
                device=device,
            )
            # every run draws from its own generators; the augmentation is applied to all runs at once
            # (one set of kernels instead of one per run: per-sample results are the same)
            with phase("draw"):
                raw = [draw_batch(p, d, step) for p, d in zip(plans, datas, strict=True)]
            with phase("augment"):
                x, y = apply_augmentation(
                    torch.cat([r[0] for r in raw]),
                    torch.cat([r[1] for r in raw]),
                    AugmentDraws.cat([r[2] for r in raw]),
                )
                x, y = x.unflatten(0, (len(plans), -1)), y.unflatten(0, (len(plans), -1))
            runs.step(x, y, lr, loss_fn, amp, phases)
            if on_step is not None:
                on_step(len(plans))
            save_now(step + 1)


def _time_steps(fn: Callable[[], None], device: torch.device, repeats: int) -> float:
    fn()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - t) / repeats


def measure_modes(
    spec: ArchSpec, batch_size: int, size: tuple[int, int], m: int, device: torch.device, repeats: int = 2
) -> tuple[float, float]:
    """(seconds per step of m runs sequentially, of m runs batched) on random data, same networks.

    Sequential is the real `train_step` with torch.optim.SGD; batched is `StackedRuns.step`."""
    from weightzoo.train.loop import make_optimizer, train_step

    g = torch.Generator().manual_seed(0)
    x = torch.randn(m, batch_size, spec.input_channels, *size, generator=g).to(device)
    y = (torch.rand(m, batch_size, spec.num_classes, *size, generator=g) > 0.8).to(torch.uint8).to(device)
    cfg = TrainConfig(
        tasks=[f"t{k}" for k in range(spec.num_classes)], preset="tiny", size=size, batch_size=batch_size
    )
    loss_fn = DiceBCELoss()
    amp = autocast_dtype(cfg, device)
    nets = [build_network(spec, seed=i).to(device).train() for i in range(m)]
    opts = [make_optimizer(n, cfg) for n in nets]

    def sequential() -> None:
        for i in range(m):
            train_step(nets[i], opts[i], loss_fn, x[i], y[i], amp, cfg.grad_clip)

    runs = StackedRuns.make(spec, [cfg] * m, device)
    lr = torch.full((m,), cfg.learning_rate, device=device)

    def batched() -> None:
        runs.step(x, y, lr, loss_fn, amp)

    return _time_steps(sequential, device, repeats), _time_steps(batched, device, repeats)


def choose_mode(
    spec: ArchSpec,
    batch_size: int,
    size: tuple[int, int],
    n_runs: int,
    device: torch.device,
    requested: str = "auto",
    log: Callable[[str], None] | None = None,
    steps: int | None = None,
) -> str:
    """'batched' or 'sequential' for n_runs compatible runs of `steps` steps. 'auto': sequential for one
    run; batched on CUDA; on the CPU, batched only if a timing of both (the n_runs, 3 steps each,
    cached per setup) shows it >= 15% faster, and sequential without timing for runs shorter than
    CALIBRATE_MIN_STEPS (the timing would cost more than it could save)."""
    if requested in ("batched", "sequential"):
        return requested if n_runs > 1 or requested == "sequential" else "sequential"
    if requested != "auto":
        raise InputError(f"unknown training mode '{requested}'", "use auto, batched or sequential")
    if n_runs < 2:
        return "sequential"
    if device.type == "cuda":
        return "batched"
    if steps is not None and steps < CALIBRATE_MIN_STEPS:
        return "sequential"
    m = n_runs  # time the batch as it will run: on the CPU batched won at M = 8 and lost at M = 32
    key = (str(device), spec.hash(), batch_size, tuple(size), m)
    if key not in _choices:
        t_seq, t_bat = measure_modes(spec, batch_size, size, m, device)
        _choices[key] = "batched" if t_bat < 0.85 * t_seq else "sequential"
        if log is not None:
            log(
                f"calibration on {device}: {m} runs · sequential {t_seq * 1e3:.0f} ms/step, "
                f"batched {t_bat * 1e3:.0f} ms/step → {_choices[key]}"
            )
    return _choices[key]
