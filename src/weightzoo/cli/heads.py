"""`weightzoo heads ...`: a shared backbone with a small head per site.

weightzoo heads train --dataset data/Dataset501_Phantom --task cord --head-stages 1 --out heads/cord
weightzoo heads train --dataset data/Dataset501_Phantom --task cord --dims 3 --patch 64,64,16 --out heads/cord3d
weightzoo heads add-site --model heads/cord --dataset data/Dataset502_New --site H --shots 10
weightzoo heads ls heads/cord
weightzoo heads export heads/cord --site B out_dir/
weightzoo segment -i image.nii.gz -m heads/cord --site B -o out.nii.gz
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from weightzoo.cli import options
from weightzoo.cli.options import distributed_options

console = Console(highlight=False)


def _num(v: Any) -> float:
    return math.nan if v is None else float(v)


def _dice(d: dict[str, Any] | None, ref: dict[str, Any] | None = None) -> str:
    """'cord 0.912 (+0.013)': val Dice per task, with the gain over `ref` (the universal head)."""
    if not d:
        return "–"
    parts = []
    for t, v in d.items():
        x = _num(v)
        cell = f"{escape(t)} {'n/a' if math.isnan(x) else f'{x:.3f}'}"
        r = _num((ref or {}).get(t))
        if ref and not (math.isnan(x) or math.isnan(r)):
            cell += f" ({x - r:+.3f})"
        parts.append(cell)
    return ", ".join(parts)


def heads_table(folder: Path) -> Table:
    """One row per head: route, training data, parameters, file size, seconds, validation Dice."""
    from weightzoo.heads.model import BACKBONE_FILE, UNIVERSAL, HeadedModel

    hm = HeadedModel.load(folder)
    bb = sum(int(v.numel()) for v in hm.backbone.values())
    table = Table(
        title=escape(
            f"{folder}: tasks {', '.join(hm.tasks)}; head = last {hm.head_stages} decoder stage(s) + seg layer"
        ),
        caption=escape(
            f"backbone: {bb:,} parameters, {(folder / BACKBONE_FILE).stat().st_size / 1024:.0f} KiB. "
            "val Dice: the head on its site's validation subjects (universal: all sites), "
            "(±): gain over the universal head on the same subjects."
        ),
    )
    for col in ("head", "route", "trained on", "params", "KiB", "s", "val Dice"):
        table.add_column(col, justify="right" if col in ("params", "KiB", "s") else "left")
    for name in [UNIVERSAL, *hm.sites()]:
        info = hm.head_info.get(name, {})
        if name == UNIVERSAL:
            trained = f"sites {', '.join(info.get('sites', []))}"
        else:
            trained = f"{len(info.get('subjects', []))} subject(s)"
            if info.get("dataset") and info.get("dataset") != hm.info.get("dataset"):
                trained += f" of {info['dataset']}"
        table.add_row(
            escape(name),
            escape(str(info.get("route", ""))),
            escape(trained),
            f"{hm.head_n_params(name):,}",
            f"{info.get('bytes', 0) / 1024:.1f}",
            f"{float(info.get('seconds', 0.0)):.1f}",
            _dice(info.get("val_dice"), None if name == UNIVERSAL else info.get("val_dice_universal")),
        )
    return table


def register(app: typer.Typer) -> None:
    """Add the `heads` command group to `app`."""
    heads_app = typer.Typer(
        help="Site heads: one backbone trained on all sites, a small head per site.", no_args_is_help=True
    )

    @heads_app.command("train")
    @distributed_options()
    def train(
        dataset: Path = typer.Option(..., "--dataset", "-d", help="nnU-Net raw dataset with a `sites` map."),
        task: str = typer.Option(None, "--task", "-t", help="Task(s), comma-separated: cord or cord,gm."),
        out: Path = typer.Option(..., "--out", "-o", help="Heads folder to write."),
        head_stages: int = typer.Option(
            1, "--head-stages", help="Decoder stages in each head (0: segmentation layer only)."
        ),
        site: list[str] = typer.Option(None, "--site", "-s", help="Train on these sites only (repeatable)."),
        preset: str = typer.Option(
            None,
            help="Network size: tiny | small | default (3-D: tiny3d | small3d | default3d). (default: small)",
        ),
        steps: int = typer.Option(None, help="Backbone training iterations. (default: 1000)"),
        head_steps: int = typer.Option(
            None, "--head-steps", help="Iterations per site head. (default: steps/10)"
        ),
        head_lr: float = typer.Option(
            None, "--head-lr", help="Head learning rate. (default: as the backbone)"
        ),
        unfreeze_steps: int = typer.Option(
            0, "--unfreeze-steps", help="Then train backbone + all heads jointly this many steps (0: off)."
        ),
        unfreeze_lr_factor: float = typer.Option(
            0.1, "--unfreeze-lr-factor", help="Joint unfreeze learning rate = lr x this."
        ),
        batch_size: int = options.BATCH_SIZE,
        lr: float = typer.Option(None, help="Backbone learning rate. (default: 1e-2 sgd)"),
        seed: int = options.SEED,
        size: int = options.SIZE,
        dims: int = options.DIMS,
        patch: str = options.PATCH,
        spacing: str = options.SPACING,
        device: str = options.DEVICE,
        config: Path = options.CONFIG,
        resume: bool = options.RESUME,
        force: bool = typer.Option(False, "--force", help="Overwrite whatever the --out folder holds."),
        progress: bool = options.PROGRESS,
    ) -> None:
        """(a) backbone + universal head on all sites, (b) one head per site (backbone frozen),
        (c) optional joint unfreeze. Killed? Run the same command again: it resumes."""
        from weightzoo.cli.train import volume_options
        from weightzoo.errors import InputError
        from weightzoo.heads.train import train_heads
        from weightzoo.train.config import TrainConfig, config_from_options, load_config_file

        given = dict(preset=preset, steps=steps, batch_size=batch_size, lr=lr, seed=seed, device=device)
        opts = {k: v for k, v in given.items() if v is not None}
        if size is not None:
            opts["size"] = [size, size]
        base = load_config_file(config) if config is not None else {}
        vol = volume_options({**base, **opts}, dims, patch, spacing)  # as `weightzoo train`
        if not vol:  # 2-D (or a 3-D config file that needs nothing more)
            cfg = config_from_options(config, task, size=size, **given)
        else:  # 3-D: the preset's 3-D twin, the patch as `size`, the spacing
            if task is not None:
                opts["tasks"] = [t.strip() for t in task.split(",") if t.strip()]
            if "tasks" not in opts and "tasks" not in base:
                raise InputError("no task given", "add --task (e.g. --task cord) or tasks: in --config")
            cfg = TrainConfig.from_dict({**base, **opts, **vol}, source=config)
        res = train_heads(
            dataset,
            cfg,
            out,
            head_stages=head_stages,
            sites=list(site) if site else None,
            head_steps=head_steps,
            head_lr=head_lr,
            unfreeze_steps=unfreeze_steps,
            unfreeze_lr_factor=unfreeze_lr_factor,
            resume=resume,
            force=force,
            progress=progress,
            log=lambda s: console.print(escape(s), soft_wrap=True),
        )
        if not res.phases_run:
            console.print(f"{escape(str(out))} already holds this finished run; use --force to retrain")
        console.print(heads_table(out))

    @heads_app.command("add-site")
    def add_site_cmd(
        model: Path = typer.Option(..., "--model", "-m", help="Heads folder (from `heads train`)."),
        dataset: Path = typer.Option(..., "--dataset", "-d", help="Dataset holding the new site's subjects."),
        site: str = typer.Option(..., "--site", "-s", help="Site (as in the dataset's `sites` map)."),
        shots: int = typer.Option(
            None, "--shots", "-k", help="Labelled training subjects to use. (default: all of the site's)"
        ),
        name: str = typer.Option(None, "--name", help="Head name. (default: the site)"),
        steps: int = typer.Option(None, help="Iterations. (default: the model's head steps)"),
        lr: float = typer.Option(None, help="Learning rate. (default: the model's head lr)"),
        seed: int = typer.Option(0, help="Seed (also picks the subjects)."),
        force: bool = typer.Option(False, "--force", help="Replace an existing head of that name."),
        resume: bool = typer.Option(True, "--resume/--no-resume", help="Continue an interrupted run."),
        progress: bool = options.PROGRESS,
    ) -> None:
        """Fine-tune a head for a site (e.g. one unseen in training) from a few labelled subjects;
        the backbone and the other heads are not touched."""
        from weightzoo.heads.train import add_site

        res = add_site(
            model, dataset, site, shots, steps, lr, seed, name, resume=resume, force=force, progress=progress
        )
        assert res.model is not None
        head = name or site
        info = res.model.head_info[head]
        console.print(
            f"head [bold]{escape(head)}[/] added to {escape(str(model))}: {len(info.get('subjects', []))} "
            f"subject(s), {res.model.head_n_params(head):,} parameters, {info.get('seconds', 0):.1f} s; "
            f"val Dice {_dice(info.get('val_dice'), info.get('val_dice_universal'))} (±: gain over the universal head)",
            soft_wrap=True,
        )

    @heads_app.command("ls")
    def ls(folder: Path = typer.Argument(..., help="Heads folder.")) -> None:
        """Sites, head sizes and validation Dice per site."""
        console.print(heads_table(folder))

    @heads_app.command("export")
    def export(
        folder: Path = typer.Argument(..., help="Heads folder."),
        out_dir: Path = typer.Argument(..., help="Model folder to write."),
        site: str = typer.Option(..., "--site", "-s", help="Head to export (a site, or 'universal')."),
        nnunet: bool = typer.Option(
            True, "--nnunet/--no-nnunet", help="Also write an nnU-Net v2 results folder inside OUT_DIR."
        ),
    ) -> None:
        """Write backbone + one head as one plain model folder (for segment/evaluate) and, inside it,
        as an nnU-Net v2 results folder (OUT_DIR/nnUNet_results/DatasetXXX_Name/nnUNetTrainer__nnUNetPlans__2d,
        or __3d_fullres for a 3-D heads model)."""
        from weightzoo.heads.segmenter import export_head

        path = export_head(folder, site, out_dir, nnunet=nnunet)
        console.print(f"[green]wrote[/] {escape(str(path))} (model folder: backbone + head '{escape(site)}')")
        if nnunet:
            for p in sorted((path / "nnUNet_results").glob("*/*/fold_0/checkpoint_final.pth")):
                console.print(f"[green]wrote[/] {escape(str(p.parent.parent))} (nnU-Net v2 results folder)")

    app.add_typer(heads_app, name="heads")
