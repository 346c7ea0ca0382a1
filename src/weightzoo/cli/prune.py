"""`weightzoo prune run|bench`: ShrinkBench-style pruning of a model folder (docs/prune.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.console import Console

console = Console(highlight=False)
prune_app = typer.Typer(
    help="Prune a model (weights or whole channels), fine-tune it, and measure it the ShrinkBench way.",
    no_args_is_help=True,
)

METHOD_HELP = (
    "global-magnitude | layer-magnitude | global-gradient | layer-gradient | random (mask weights, "
    "--ratio) | channels | channels-random (remove channels, --speedup)."
)


def _numbers(value: str, option: str) -> list[float]:
    from weightzoo.errors import InputError

    try:
        out = [float(v) for v in value.split(",") if v.strip()]
    except ValueError:
        out = []
    if not out:
        raise InputError(
            f"{option} '{value}' is not a comma-separated list of numbers", f"e.g. {option} 2,4,8"
        )
    return out


def _data(model_dir: Path, seg: Any, dataset: Path) -> tuple[Any, Any, Any, Any, dict[str, Any]]:
    """(train, val, test) SliceSets of the model's sites in the model's preprocessing, and their record."""
    from weightzoo.data.raw import RawDataset
    from weightzoo.data.slices import load_slices
    from weightzoo.errors import InputError
    from weightzoo.segmenter import read_model_json

    ds = RawDataset.open(dataset)
    for t in seg.tasks:
        ds.task_labels(t)
    trained_on = read_model_json(model_dir).get("info", {}).get("sites") or []
    sites = [s for s in trained_on if s in ds.sites()] or None
    cases = {split: ds.cases_in(split, sites) for split in ("train", "val", "test")}
    if not cases["train"]:
        raise InputError("no training cases for the model's sites", "check the dataset's splits", ds.root)

    def slices(split: str) -> Any:
        return (
            load_slices(ds, seg.tasks, prep=seg.preprocessing, cases=cases[split]) if cases[split] else None
        )

    record = {"dataset": ds.name, "dataset_path": str(ds.root), "sites": sites or ds.sites()}
    return slices("train"), slices("val"), slices("test"), ds, record


@prune_app.command("run")
def run(
    model: Path = typer.Option(..., "--model", "-m", help="Model folder to prune (it is not changed)."),
    method: str = typer.Option(..., "--method", help=METHOD_HELP),
    out: Path = typer.Option(..., "--out", "-o", help="Model folder to write (route 'prune')."),
    ratio: float = typer.Option(
        None, help="Compression: all parameters / nonzero parameters (masking methods)."
    ),
    speedup: float = typer.Option(None, help="FLOP speedup to reach by removing channels (channel methods)."),
    dataset: Path = typer.Option(
        None, "--dataset", "-d", help="Dataset for fine-tuning and gradient scores."
    ),
    finetune_steps: int = typer.Option(0, "--finetune-steps", help="Fine-tuning steps after pruning."),
    lr: float = typer.Option(1e-3, help="Fine-tuning learning rate."),
    optimizer: str = typer.Option("adam", help="Fine-tuning optimizer: adam | sgd."),
    batch_size: int = typer.Option(16, "--batch-size", help="Fine-tuning batch size."),
    seed: int = typer.Option(0, help="Seed of random scores, gradient batch and fine-tuning."),
    round_to: int = typer.Option(
        8, "--round-to", help="Channel methods: stage widths are multiples of this."
    ),
    device: str = typer.Option("auto", help="auto | cpu | cuda[:i] (fine-tuning)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Prune a model folder and fine-tune it; writes a model folder that segment/evaluate/zoo export accept.

    Killed during fine-tuning? Run the same command again: it resumes.
    """
    from weightzoo.errors import InputError
    from weightzoo.nets.unet import require_2d, require_plain_unet
    from weightzoo.prune.model import PruneRecipe, prune_and_finetune
    from weightzoo.segmenter import load_model

    recipe = PruneRecipe(
        method=method,
        ratio=ratio,
        speedup=speedup,
        round_to=round_to,
        seed=seed,
        finetune_steps=finetune_steps,
        optimizer=optimizer,
        lr=lr,
        batch_size=batch_size,
    )
    if dataset is None and (finetune_steps or "gradient" in method):
        raise InputError(
            f"--method {method} with --finetune-steps {finetune_steps} needs data", "add --dataset"
        )
    seg = load_model(model, "cpu")
    require_plain_unet(seg.spec, "pruning", model)
    require_2d(seg.spec, "pruning", model)
    train = val = None
    record: dict[str, Any] = {}
    if dataset is not None:
        train, val, _, _, record = _data(model, seg, dataset)
    _, info = prune_and_finetune(seg, recipe, out, train, val, device, progress, data_info=record)
    p = info["pruned"]
    console.print(
        f"pruned model written to [bold]{out}[/] · {method}: compression {p['compression']:.2f}×, "
        f"{p['nonzero_size']:,} of {info['original']['size']:,} weights nonzero, theoretical speedup "
        f"{p['theoretical_speedup']:.2f}×, measured {p['measured_speedup']:.2f}× "
        f"({info['threads']} CPU threads, batch of {info['latency_batch']})"
    )


@prune_app.command("bench")
def bench(
    model: Path = typer.Option(..., "--model", "-m", help="Model folder to prune."),
    dataset: Path = typer.Option(
        ..., "--dataset", "-d", help="Dataset: train split fine-tunes, test split scores."
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Bench folder (a killed bench resumes)."),
    methods: str = typer.Option("all", help="Comma-separated methods, or all. " + METHOD_HELP),
    ratios: str = typer.Option("2,4,8,16,32", help="Compression ratios of the masking methods."),
    speedups: str = typer.Option("1.5,2,3", help="FLOP speedups of the channel methods."),
    seeds: int = typer.Option(3, help="Seeds of pruning + fine-tuning per cell."),
    finetune_steps: int = typer.Option(
        200, "--finetune-steps", help="The one fine-tuning budget of every cell."
    ),
    lr: float = typer.Option(1e-3, help="Fine-tuning learning rate."),
    optimizer: str = typer.Option("adam", help="Fine-tuning optimizer: adam | sgd."),
    batch_size: int = typer.Option(16, "--batch-size", help="Fine-tuning batch size."),
    round_to: int = typer.Option(
        8, "--round-to", help="Channel methods: stage widths are multiples of this."
    ),
    device: str = typer.Option("auto", help="auto | cpu | cuda[:i] (fine-tuning)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Every method × target × seed with one fine-tuning budget: a table, curves and report.html."""
    from weightzoo.errors import InputError, UnknownNameError
    from weightzoo.nets.unet import require_2d, require_plain_unet
    from weightzoo.prune.bench import plan_cells, run_bench
    from weightzoo.prune.model import METHODS, PruneRecipe
    from weightzoo.prune.report import markdown_table, write_report
    from weightzoo.segmenter import load_model
    from weightzoo.train.loop import progress_bar

    chosen = list(METHODS) if methods == "all" else [m.strip() for m in methods.split(",") if m.strip()]
    for m in chosen:
        if m not in METHODS:
            raise UnknownNameError("pruning method", m, list(METHODS))
    if seeds < 1:
        raise InputError(f"--seeds {seeds} is not ≥ 1", "give e.g. --seeds 3")
    seg = load_model(model, "cpu")
    require_plain_unet(seg.spec, "pruning", model)
    require_2d(seg.spec, "pruning", model)
    train, val, test, ds, _ = _data(model, seg, dataset)
    if test is None:
        raise InputError("the dataset has no test cases for the model's sites", "check its splits", ds.root)
    base = PruneRecipe(
        method="global-magnitude",
        ratio=1.0,
        round_to=round_to,
        finetune_steps=finetune_steps,
        optimizer=optimizer,
        lr=lr,
        batch_size=batch_size,
    )
    cells = plan_cells(chosen, _numbers(ratios, "--ratios"), _numbers(speedups, "--speedups"), seeds)
    prog, bar = progress_bar("[bold]prune bench[/]", progress, len(cells))
    with prog:
        results = run_bench(
            seg,
            cells,
            base,
            train,
            val,
            test,
            out,
            device,
            on_cell=lambda i, n, name: prog.update(bar, completed=i),
        )
    write_report(results, out)
    console.print(markdown_table(results))
    console.print(f"results in [bold]{out}[/]: results.json, report.html, figures/prune_curves.png")


def register(app: typer.Typer) -> None:
    """Add the `prune` command group to `app`."""
    app.add_typer(prune_app, name="prune")
