"""Options shared by the commands that train (one definition, the same help everywhere)."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import typer

BATCH_SIZE = typer.Option(None, "--batch-size", help="Slices per batch. (default: 16)")
SEED = typer.Option(None, help="Random seed. (default: 0)")
SIZE = typer.Option(None, help="Slices are resized to SIZE x SIZE. (default: 64)")
DEVICE = typer.Option(None, help="auto | cpu | cuda. (default: auto)")
CONFIG = typer.Option(None, "--config", "-c", help="YAML/JSON training config; options override it.")
RESUME = typer.Option(True, "--resume/--no-resume", help="Continue an interrupted run.")
PROGRESS = typer.Option(True, "--progress/--no-progress", help="Show progress bars.")
# 3-D training (weightzoo.cli.train.volume_options turns them into config keys)
DIMS = typer.Option(
    None,
    "--dims",
    help="3: a 3-D nnU-Net (3d_fullres-like) trained on patches of whole volumes; the preset becomes "
    "its 3-D twin (small -> small3d). (default: 2, slices)",
)
PATCH = typer.Option(
    None,
    "--patch",
    help="3-D patch in the NIfTI's voxel axes, e.g. 64,64,32 (the last = along the slices). (default: 64,64,64)",
)
SPACING = typer.Option(
    None,
    "--spacing",
    help="3-D target spacing in mm in the voxel axes, e.g. 0.8,0.8,3; cases are resampled to it by "
    "nnU-Net's rules. (default: the training cases' median)",
)


# ---- data-parallel training under torchrun (weightzoo.train.distributed) ----------------------------
_DIST_PARAMS: dict[str, tuple[type, Any]] = {
    "ddp": (bool, typer.Option(False, "--ddp", help="Under torchrun: synchronous data-parallel training.")),
    "local_sgd": (
        int,
        typer.Option(
            0, "--local-sgd", help="Under torchrun: post-local SGD, H local steps between averages."
        ),
    ),
    "warmup_sync": (int, typer.Option(0, "--warmup-sync", help="Synchronous steps before local SGD starts.")),
    "slowmo": (
        float,
        typer.Option(0.0, "--slowmo", help="SlowMo outer momentum β at each average (e.g. 0.5)."),
    ),
    "slowmo_lr": (float, typer.Option(1.0, "--slowmo-lr", help="SlowMo outer learning rate α.")),
    "average_optimizer": (
        bool,
        typer.Option(False, "--average-optimizer", help="Average optimizer state at each average too."),
    ),
    "split": (
        str,
        typer.Option(
            "batch",
            "--split",
            help="How ranks share data: batch (rows of one global batch) | site | subject (own shard each).",
        ),
    ),
}


def distributed_options(local_sgd: bool = True) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Add the data-parallel options to a typer command, which then runs inside
    `launch_options(DistOptions(...))`: every training loop it starts picks them up.

    local_sgd=False: --ddp alone (routes whose loop averages gradients only)."""
    names = list(_DIST_PARAMS) if local_sgd else ["ddp"]

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        sig = inspect.signature(fn, eval_str=True)  # typer needs real types, not postponed strings
        params = list(sig.parameters.values())
        extra = [
            inspect.Parameter(
                n, inspect.Parameter.KEYWORD_ONLY, default=_DIST_PARAMS[n][1], annotation=_DIST_PARAMS[n][0]
            )
            for n in names
        ]

        @functools.wraps(fn)
        def command(**kwargs: Any) -> Any:
            from weightzoo.train.distributed import DistOptions, launch_options

            with launch_options(DistOptions(**{n: kwargs.pop(n) for n in names})):
                return fn(**kwargs)

        command.__signature__ = sig.replace(parameters=params + extra)  # type: ignore[attr-defined]
        command.__annotations__ = {}
        return command

    return decorate
