"""`weightzoo hyper ...`: hypernetworks that output a U-Net's weights for a condition.

weightzoo hyper train --dataset D --task cord --condition scale --out hyper/          # one run, every φ
weightzoo hyper front --model hyper/ --dataset D --split val                        # Dice vs FLOPs vs latency
weightzoo hyper sample --model hyper/ --scale 0.6 --out net/                         # a plain model folder
weightzoo hyper train --dataset D --task cord --condition site --out hyper_site/     # weights per site
weightzoo segment -i img.nii.gz -m hyper/ --scale 0.6 -o out.nii.gz
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from weightzoo.cli import options
from weightzoo.cli.options import distributed_options

console = Console(highlight=False)


def register(app: typer.Typer) -> None:
    """Add the `hyper` command group to `app`."""
    hyper_app = typer.Typer(
        help="Hypernetworks: one training run gives weights for every scale φ or every site.",
        no_args_is_help=True,
    )

    @hyper_app.command("train")
    @distributed_options()
    def train(
        dataset: Path = typer.Option(..., "--dataset", "-d", help="nnU-Net raw dataset."),
        task: str = typer.Option(None, "--task", "-t", help="Task(s), comma-separated: cord or cord,gm."),
        out: Path = typer.Option(..., "--out", "-o", help="Hyper folder to write."),
        condition: str = typer.Option(
            "scale", "--condition", help="scale (φ of a scale-space U-Net) | site."
        ),
        mip: bool = typer.Option(
            True, "--mip/--no-mip", help="MIP parametrization (default) or the default one."
        ),
        output: str = typer.Option(
            "chunked", "--output", help="Hypernetwork output layer: chunked | lowrank | full."
        ),
        hidden: str = typer.Option("64,64", "--hidden", help="Hypernetwork hidden sizes, comma-separated."),
        scale_range: str = typer.Option("0.25,0.75", "--scale-range", help="Range of φ to train on: LO,HI."),
        site: list[str] = typer.Option(None, "--site", "-s", help="Train on these sites only (repeatable)."),
        preset: str = typer.Option(
            None, help="Primary network size: tiny | small | default. (default: small)"
        ),
        steps: int = typer.Option(None, help="Training iterations. (default: 1000)"),
        batch_size: int = options.BATCH_SIZE,
        optimizer: str = typer.Option(None, help="sgd | adam. (default: adam)"),
        lr: float = typer.Option(None, help="Learning rate. (default: 1e-2, the rate the benchmarks use)"),
        seed: int = options.SEED,
        size: int = options.SIZE,
        device: str = options.DEVICE,
        config: Path = options.CONFIG,
        resume: bool = options.RESUME,
        force: bool = typer.Option(False, "--force", help="Overwrite the hypernetwork in --out."),
        progress: bool = options.PROGRESS,
    ) -> None:
        """Train one hypernetwork. Killed? Run the same command again: it resumes."""
        from weightzoo.errors import InputError
        from weightzoo.hyper.model import HyperConfig
        from weightzoo.hyper.train import train_hyper
        from weightzoo.train.config import config_from_options

        def numbers(text: str, what: str, cast: type) -> list:
            try:
                return [cast(v) for v in text.split(",") if v.strip()]
            except ValueError:
                raise InputError(
                    f"{what} {text!r} is not a comma-separated list of numbers",
                    f"e.g. --{what} {'64,64' if cast is int else '0.25,0.75'}",
                ) from None

        rng = numbers(scale_range, "scale-range", float)
        if len(rng) != 2:
            raise InputError(
                f"--scale-range {scale_range!r} needs two numbers", "e.g. --scale-range 0.25,0.75"
            )
        cfg = config_from_options(
            config, task, {"optimizer": "adam", "lr": 1e-2}, size, preset=preset, steps=steps, batch_size=batch_size,
            optimizer=optimizer, lr=lr, seed=seed, device=device,
        )  # fmt: skip
        hcfg = HyperConfig(
            condition=condition,
            mip=mip,
            output=output,
            hidden=numbers(hidden, "hidden", int),
            scale_range=(rng[0], rng[1]),
        )
        model, trained = train_hyper(
            dataset,
            cfg,
            hcfg,
            out,
            list(site) if site else None,
            resume,
            force,
            progress,
            log=lambda s: console.print(escape(s), soft_wrap=True),
        )
        assert model is not None
        if not trained:
            console.print(f"{escape(str(out))} already holds this finished run; use --force to retrain")
        console.print(summary_line(out))

    @hyper_app.command("front")
    def front(
        model: Path = typer.Option(..., "--model", "-m", help="Hyper folder of a scale hypernetwork."),
        dataset: Path = typer.Option(..., "--dataset", "-d", help="nnU-Net raw dataset."),
        split: str = typer.Option("val", "--split", help="train | val | test."),
        scales: str = typer.Option(
            None, "--scales", help="φ values, comma-separated. (default: 11 over the trained range)"
        ),
        out: Path = typer.Option(
            None, "--out", "-o", help="Folder for front.json and front.png. (default: MODEL/front_SPLIT)"
        ),
        device: str = typer.Option("cpu", "--device", help="Device for Dice and latency: cpu | cuda | auto."),
    ) -> None:
        """Dice vs FLOPs vs measured latency over φ, from the one hypernetwork: a table and a figure."""
        from weightzoo.data.raw import SPLIT_NAMES, RawDataset
        from weightzoo.errors import InputError, UnknownNameError
        from weightzoo.hyper.front import write_front

        if split not in SPLIT_NAMES:
            raise UnknownNameError("split", split, list(SPLIT_NAMES))
        try:
            phis = [float(v) for v in scales.split(",")] if scales else None
        except ValueError:
            raise InputError(
                f"--scales {scales!r} is not a list of numbers", "e.g. --scales 0.25,0.5,0.75"
            ) from None
        ds = RawDataset.open(dataset)
        with Console(stderr=True).status("sampling and evaluating…") as status:
            rows, fig = write_front(
                model,
                out or Path(model) / f"front_{split}",
                ds,
                split,
                device,
                phis,
                on_scale=lambda i, n, phi: status.update(f"φ = {phi:g} ({i}/{n})"),
            )
        table = Table(title=escape(f"{model}: accuracy-cost front on {ds.name} ({split})"))
        for col in ("φ", "Dice", "GFLOPs", "latency ms"):
            table.add_column(col, justify="right")
        for r in rows:
            table.add_row(
                f"{r['scale']:g}",
                ", ".join(f"{escape(t)} {d:.3f}" for t, d in r["dice"].items()),
                f"{r['flops'] / 1e9:.3f}",
                f"{r['latency_ms']:.2f}",
            )
        console.print(table)
        console.print(f"[green]wrote[/] {escape(str(fig))} and front.json", soft_wrap=True)

    @hyper_app.command("sample")
    def sample(
        model: Path = typer.Option(..., "--model", "-m", help="Hyper folder."),
        out: Path = typer.Option(..., "--out", "-o", help="Model folder to write."),
        scale: float = typer.Option(None, "--scale", help="φ (scale hypernetworks)."),
        site: str = typer.Option(
            None, "--site", "-s", help="Site (site hypernetworks; none: unknown-site weights)."
        ),
    ) -> None:
        """Write the network for one condition as a plain model folder (for segment, evaluate, export)."""
        from weightzoo.hyper.model import sample_to_folder

        path = sample_to_folder(model, out, scale, site)
        console.print(f"[green]wrote[/] {escape(str(path))} (model folder)")

    app.add_typer(hyper_app, name="hyper")


def summary_line(folder: Path) -> str:
    from weightzoo.hyper.model import read_hyper_json

    meta = read_hyper_json(folder)
    hist = meta["info"].get("history") or [{}]
    last = hist[-1].get("val_dice") or {}
    dice = ", ".join(f"{t} {'n/a' if d is None else f'{d:.3f}'}" for t, d in last.items()) or "no val split"
    h = meta["hyper"]
    return escape(
        f"{folder}: {h['condition']} hypernetwork ({'MIP' if h['mip'] else 'default'}, {h['output']} output), "
        f"{meta['n_hyper_params']:,} hypernetwork parameters, {meta['seconds_to_build']:.0f} s; last val Dice {dice}"
    )
