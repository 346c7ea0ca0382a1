"""`weightzoo evaluate`: score a model folder on a dataset split, write summary.json, print a table.

    weightzoo evaluate --model runs/cord --dataset data/Dataset501_Phantom --split test [--site A]...

The summary (nnU-Net-style, see `weightzoo.evaluate.summary`) goes to MODEL/eval_<split>/summary.json
unless --out names a .json file or a folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from weightzoo.cli.segment import MC_SEED_OPTION, SCALE_OPTION, ZOO_OPTION
from weightzoo.data.raw import SPLIT_NAMES, RawDataset
from weightzoo.errors import InputError, UnknownNameError
from weightzoo.evaluate.summary import evaluate_segmenter, summary_line, write_summary
from weightzoo.heads import evaluate_headed, is_heads_folder, load_any_model
from weightzoo.hyper.model import evaluate_hyper_sites, hyper_segmenter, is_hyper_folder
from weightzoo.segmenter import MODEL_JSON, load_model


def summary_path(model_dir: Path, split: str, out: Path | None) -> Path:
    """Where summary.json goes: --out FILE.json, --out DIR/summary.json, else MODEL/eval_<split>/."""
    if out is None:
        return Path(model_dir) / f"eval_{split}" / "summary.json"
    return out if out.suffix.lower() == ".json" else out / "summary.json"


def summary_table(summary: dict[str, Any]) -> Table:
    """Rich table: one row per task and site (then all sites), Dice and HD95 as mean ± sd."""
    unit = summary.get("hd95_unit", "px")
    where = f"{summary.get('dataset', '?')} ({summary.get('split', '?')}, {summary['n_cases']} cases)"
    table = Table(title=escape(f"{summary['model']} on {where}"))
    for col, justify in (
        ("task", "left"),
        ("site", "left"),
        ("cases", "right"),
        ("Dice", "right"),
        (f"HD95 ({unit})", "right"),
    ):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    sites = list(summary["per_site"])
    for task in summary["tasks"]:
        for site in sites:
            n = summary["per_site_n_cases"][site]
            table.add_row(
                escape(task),
                escape(site),
                str(n),
                summary_line(summary, task, "Dice", site),
                summary_line(summary, task, "HD95", site),
            )
        if len(sites) > 1 or not sites:
            table.add_row(
                escape(task),
                "[bold]all[/]",
                str(summary["n_cases"]),
                f"[bold]{summary_line(summary, task, 'Dice')}[/]",
                summary_line(summary, task, "HD95"),
            )
    return table


def register(app: typer.Typer) -> None:
    @app.command("evaluate")
    def evaluate(
        model: Path = typer.Option(
            ...,
            "-m",
            "--model",
            help="Model folder (model.json + model.safetensors), or ZOO:CKPT (an ingested nnU-Net checkpoint).",
        ),
        dataset: Path = typer.Option(
            ..., "-d", "--dataset", help="nnU-Net raw dataset folder DatasetXXX_Name."
        ),
        split: str = typer.Option("test", "--split", help="train | val | test | all."),
        site: list[str] | None = typer.Option(
            None, "--site", help="Only these sites; repeatable (default: all)."
        ),
        task: list[str] | None = typer.Option(
            None, "--task", help="Only these tasks (default: all the model's)."
        ),
        thr: float = typer.Option(0.5, "-thr", "--threshold", help="Binarisation threshold in (0, 1)."),
        out: Path | None = typer.Option(
            None, "-o", "--out", help="summary .json file or folder (default: MODEL/eval_SPLIT/)."
        ),
        device: str = typer.Option("auto", "--device", help="auto | cpu | cuda."),
        uncertainty: str | None = typer.Option(
            None,
            "--uncertainty",
            help="Also score uncertainty from mc:T (MC dropout), tta:T or zoo:K (needs --zoo and one --site): "
            "calibration (ECE/ACE/MCE, Brier, NLL, also in a boundary band), AUROC, UEO (docs/uncertainty.md).",
        ),
        zoo: Path | None = ZOO_OPTION,
        seed: int = MC_SEED_OPTION,
        scale: float | None = SCALE_OPTION,
    ) -> None:
        """Evaluate a model per case (Dice, IoU, HD95; nnU-Net rules) and write summary.json."""
        if split not in (*SPLIT_NAMES, "all"):
            raise UnknownNameError("split", split, [*SPLIT_NAMES, "all"])
        from weightzoo.cli.segment import zoo_checkpoint

        zoo_ckpt = zoo_checkpoint(model)
        heads = zoo_ckpt is None and is_heads_folder(
            model
        )  # site heads: each case is routed to its site's head
        hyper_sites = False
        if zoo_ckpt is not None:  # an nnU-Net checkpoint ingested into a zoo: nnU-Net's own inference
            from weightzoo.segmenter import resolve_device
            from weightzoo.volume.predictor import volume_segmenter_from_zoo

            seg = volume_segmenter_from_zoo(*zoo_ckpt, device=resolve_device(device))
            if out is None:
                out = zoo_ckpt[0] / f"eval_{zoo_ckpt[1]}_{split}" / "summary.json"
        elif is_hyper_folder(
            model
        ):  # scale: the network for --scale; site: each case gets its site's weights
            from weightzoo.hyper.model import read_hyper_json

            hyper_sites = read_hyper_json(model)["hyper"]["condition"] == "site"
            seg = hyper_segmenter(model, scale, None, device)  # a site model: the unknown-site weights
        elif scale is not None:
            raise InputError("--scale needs a scale hypernetwork folder (hyper.json)", "drop --scale", model)
        else:
            seg = load_any_model(model, device=device) if heads else load_model(model, device=device)
        for t in task or []:
            if t not in seg.tasks:
                raise UnknownNameError("task", t, seg.tasks, Path(model) / MODEL_JSON)
        ds = RawDataset.open(dataset)
        for s in site or []:
            ds.check_site(s)
        err = Console(stderr=True)
        with err.status("evaluating…") as status:
            kwargs: dict[str, Any] = dict(
                split=None if split == "all" else split,
                sites=site or None,
                tasks=task or None,
                threshold=thr,
                on_case=lambda i, n, case: status.update(f"evaluating {case} ({i}/{n})"),
            )
            if heads:
                summary = evaluate_headed(model, ds, device=device, **kwargs)
            elif hyper_sites:
                summary = evaluate_hyper_sites(model, ds, device=device, **kwargs)
            else:
                summary = evaluate_segmenter(seg, ds, **kwargs)
        if uncertainty is not None:
            from weightzoo.uncertainty.evaluate import evaluate_uncertainty
            from weightzoo.uncertainty.sources import make_source

            if heads or hyper_sites:
                raise InputError(
                    "--uncertainty works on model folders, not heads or site-hypernetwork folders",
                    "drop --uncertainty, or sample one site with weightzoo hyper sample",
                )
            one_site = site[0] if site and len(site) == 1 else None
            one_task = task[0] if task and len(task) == 1 else None
            source, seg = make_source(uncertainty, seg, seed, zoo, one_site, one_task)
            with err.status(f"sampling {uncertainty}…"):
                summary["uncertainty"] = evaluate_uncertainty(
                    seg, source, ds, None if split == "all" else split, site or None, task or None
                )
        path = write_summary(summary, summary_path(model, split, out))
        console = Console()
        console.print(summary_table(summary))
        if uncertainty is not None:
            u = summary["uncertainty"]["mean"]
            for t, m in u.items():
                console.print(
                    f"{escape(t)} · {escape(uncertainty)}: Dice {m['dice']:.3f} · ECE {m['ece']:.4f} "
                    f"(boundary band {m['ece_band']:.4f}) · Brier {m['brier']:.4f} · AUROC {m['auroc']:.3f} "
                    f"· UEO {m['ueo']:.3f}",
                    highlight=False,
                )
        console.print(f"[green]wrote[/] {escape(str(path))}", highlight=False, soft_wrap=True)
