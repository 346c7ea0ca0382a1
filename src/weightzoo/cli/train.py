"""`weightzoo train`: one nnU-Net-recipe training run on an nnU-Net raw dataset, resumable."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.console import Console

from weightzoo.cli import options
from weightzoo.cli.options import distributed_options

console = Console(highlight=False)


def _overrides(**options: Any) -> dict[str, Any]:
    """Command-line options that were given (not None) as TrainConfig keys."""
    return {k: v for k, v in options.items() if v is not None}


def _numbers(text: str, option: str, kind: type) -> list[Any]:
    try:
        values = [kind(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) != 3:
        from weightzoo.errors import InputError

        raise InputError(f"{option} {text!r} is not three comma-separated numbers", f"e.g. {option} 64,64,32")
    return values


def volume_options(
    cfg: dict[str, Any], dims: int | None, patch: str | None, spacing: str | None
) -> dict[str, Any]:
    """Config keys from --dims/--patch/--spacing: --dims 3 turns the preset into its 3-D twin
    (small -> small3d) and the patch into `size`."""
    from weightzoo.errors import InputError
    from weightzoo.nets.unet import PRESETS_3D

    preset = str(cfg.get("preset", "small"))
    is_3d = preset in PRESETS_3D
    if dims not in (None, 2, 3):
        raise InputError(f"--dims {dims}", "give --dims 2 (slices) or --dims 3 (volumes)")
    if dims == 2 and is_3d:
        raise InputError(f"--dims 2 with the 3-D preset {preset}", "drop --dims or choose a 2-D preset")
    out: dict[str, Any] = {}
    if dims == 3 and not is_3d:
        out["preset"] = preset = f"{preset}3d"
        is_3d = True
    if not is_3d:
        if patch is not None or spacing is not None:
            raise InputError("--patch/--spacing are for 3-D training", "add --dims 3, or use --size for 2-D")
        return out
    if patch is not None:
        out["size"] = _numbers(patch, "--patch", int)
    if spacing is not None:
        out["spacing"] = _numbers(spacing, "--spacing", float)
    return out


def register(app: typer.Typer) -> None:
    """Add the `train` command to `app`."""

    @app.command("train")
    @distributed_options()
    def train(
        dataset: Path = typer.Option(
            ..., "--dataset", "-d", help="nnU-Net raw dataset folder DatasetXXX_Name."
        ),
        task: str = typer.Option(
            None, "--task", "-t", help="Task(s) to segment, comma-separated: cord or cord,gm."
        ),
        site: list[str] = typer.Option(None, "--site", "-s", help="Train on this site only (repeatable)."),
        preset: str = typer.Option(None, help="Network size: tiny | small | default. (default: small)"),
        steps: int = typer.Option(None, help="Training iterations (batches). (default: 1000)"),
        batch_size: int = typer.Option(
            None, "--batch-size", help="Slices (3-D: patches) per batch. (default: 16; 3-D: 2)"
        ),
        optimizer: str = typer.Option(
            None, help="sgd (nnU-Net: Nesterov 0.99, poly lr) | adam. (default: sgd)"
        ),
        lr: float = typer.Option(None, help="Initial learning rate. (default: 1e-2 sgd, 1e-3 adam)"),
        seed: int = typer.Option(None, help="Random seed; same seed, same weights. (default: 0)"),
        augment: float = typer.Option(None, help="Augmentation strength in [0, 1]; 0 = off. (default: 1)"),
        size: int = typer.Option(None, help="Slices are resized to SIZE x SIZE pixels. (default: 64)"),
        dims: int = options.DIMS,
        patch: str = options.PATCH,
        spacing: str = options.SPACING,
        dropout: float = typer.Option(
            None,
            help="Spatial dropout (nnU-Net's dropout_op) after every conv; enables segment/evaluate "
            "--uncertainty mc:T. (default: 0)",
        ),
        device: str = typer.Option(None, help="auto | cpu | cuda. (default: auto)"),
        out: Path = typer.Option(None, "--out", "-o", help="Model folder to write. (default: runs/<tasks>)"),
        config: Path = typer.Option(
            None, "--config", "-c", help="YAML/JSON training config; options override it."
        ),
        resume: bool = typer.Option(
            True, "--resume/--no-resume", help="Continue from the folder's checkpoint."
        ),
        force: bool = typer.Option(False, "--force", help="Overwrite whatever the --out folder holds."),
        progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
    ) -> None:
        """Train a U-Net (nnU-Net's 2-D recipe) for one or more binary tasks; writes a model folder.

        Killed? Run the same command again: it resumes from the last checkpoint and ends with the
        same weights as an uninterrupted run. Several processes: `torchrun --nproc-per-node N -m
        weightzoo train ... --ddp` (or --local-sgd H); see docs/distributed.md.
        """
        from weightzoo.data.raw import RawDataset
        from weightzoo.errors import InputError
        from weightzoo.train.loop import TrainConfig, format_dice, load_config_file, train_model

        opts = _overrides(
            preset=preset,
            steps=steps,
            batch_size=batch_size,
            optimizer=optimizer,
            lr=lr,
            seed=seed,
            augment=augment,
            device=device,
            dropout=dropout,
            size=[size, size] if size is not None else None,
        )
        if task is not None:
            opts["tasks"] = [t.strip() for t in task.split(",") if t.strip()]
        base = load_config_file(config) if config is not None else {}
        opts.update(volume_options({**base, **opts}, dims, patch, spacing))
        if "tasks" not in opts and "tasks" not in base:
            raise InputError(
                "no task given", "add --task (e.g. --task cord or --task cord,gm) or tasks: in --config"
            )
        cfg = TrainConfig.from_dict({**base, **opts}, source=config)
        ds = RawDataset.open(dataset)
        out_dir = out if out is not None else Path("runs") / "_".join(cfg.tasks)
        console.print(
            f"training [bold]{', '.join(cfg.tasks)}[/] on {ds.name} "
            f"(sites: {', '.join(site) if site else 'all'}) · preset {cfg.preset} · {cfg.steps} steps · "
            f"{cfg.optimizer} · seed {cfg.seed} → {out_dir}"
        )
        sites = list(site) if site else None
        result = train_model(ds, cfg, out_dir, sites=sites, resume=resume, force=force, progress=progress)
        final = result.history[-1] if result.history else {}
        dice = format_dice(final.get("val_dice", {})) or "no validation split"
        if result.skipped:
            console.print(
                f"{out_dir} already holds this finished run (val Dice {dice}); use --force to retrain"
            )
            return
        if result.resumed_from:
            console.print(f"resumed from step {result.resumed_from}")
        console.print(
            f"model written to [bold]{out_dir}[/] ({result.segmenter.n_params:,} parameters, "
            f"{result.seconds:.0f} s) · val Dice {dice}"
        )
