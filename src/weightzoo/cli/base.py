"""`weightzoo base train`: one multi-task, multi-site base network for a zoo of fine-tunes.

A base is an ordinary model folder (route `base`): `weightzoo train` with every task of the dataset
(or --tasks) on every site (or --site). It is what the heads route calls the universal model, with
all tasks at once. Zoo grids start fine-tunes from it with `from: BASE_FOLDER` (docs/zoo.md).
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from weightzoo.cli.options import distributed_options

console = Console(highlight=False)


def register(app: typer.Typer) -> None:
    """Add the `base` command group to `app`."""
    base_app = typer.Typer(no_args_is_help=True, help="Base networks: one network fine-tune zoos start from.")
    app.add_typer(base_app, name="base")

    @base_app.command("train")
    @distributed_options()
    def train(
        dataset: Path = typer.Option(..., "--dataset", "-d", help="nnU-Net raw dataset folder."),
        tasks: str = typer.Option(
            None, "--tasks", "-t", help="Comma-separated tasks. (default: all of the dataset's)"
        ),
        site: list[str] = typer.Option(
            None, "--site", "-s", help="Train on this site (repeatable). (default: all)"
        ),
        preset: str = typer.Option("small", help="Network size: tiny | small | default."),
        steps: int = typer.Option(1000, help="Training iterations (batches)."),
        batch_size: int = typer.Option(16, "--batch-size", help="Slices per batch."),
        optimizer: str = typer.Option("sgd", help="sgd (nnU-Net) | adam."),
        lr: float = typer.Option(None, help="Initial learning rate. (default: 1e-2 sgd, 1e-3 adam)"),
        seed: int = typer.Option(0, help="Random seed."),
        size: int = typer.Option(64, help="Slices are resized to SIZE x SIZE pixels."),
        device: str = typer.Option("auto", help="auto | cpu | cuda."),
        out: Path = typer.Option(..., "--out", "-o", help="Model folder to write."),
        force: bool = typer.Option(False, "--force", help="Overwrite whatever the --out folder holds."),
        progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
    ) -> None:
        """Train one network for several tasks on all sites: the base of a fine-tune zoo. Resumable."""
        from weightzoo.data.raw import RawDataset
        from weightzoo.fileio import atomic_write_json
        from weightzoo.segmenter import MODEL_JSON, read_model_json
        from weightzoo.train.config import TrainConfig
        from weightzoo.train.loop import format_dice, train_model

        ds = RawDataset.open(dataset)
        names = [t.strip() for t in tasks.split(",") if t.strip()] if tasks else sorted(ds.tasks)
        from weightzoo.errors import InputError
        from weightzoo.nets.unet import PRESETS_3D

        if preset in PRESETS_3D:
            raise InputError(
                f"bases are 2-D; preset {preset} is 3-D", "use a 2-D preset (tiny, small, default)"
            )
        cfg = TrainConfig(
            tasks=names,
            preset=preset,
            steps=steps,
            batch_size=batch_size,
            optimizer=optimizer,
            lr=lr,
            seed=seed,
            size=(size, size),
            device=device,
        )
        sites = list(site) if site else None
        console.print(
            f"base: [bold]{', '.join(names)}[/] on {ds.name} (sites: {', '.join(sites or ds.sites())}) · "
            f"preset {preset} · {steps} steps → {out}"
        )
        res = train_model(ds, cfg, out, sites=sites, force=force, progress=progress)
        meta = read_model_json(out)
        if meta.get("route") != "base":
            atomic_write_json(Path(out) / MODEL_JSON, {**meta, "route": "base"})
        final = res.history[-1] if res.history else {}
        console.print(
            f"base written to [bold]{out}[/] ({res.segmenter.n_params:,} parameters) · val Dice "
            f"{format_dice(final.get('val_dice', {})) or 'no validation split'}"
        )
