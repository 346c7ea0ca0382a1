"""`weightzoo zoo build|ls|verify|ingest|export|soup`: the checkpoint zoo from the command line."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

console = Console(highlight=False)
zoo_app = typer.Typer(
    help="Checkpoint zoos: build, list, verify, ingest nnU-Net results, export.", no_args_is_help=True
)


def _fmt(v: float | None, digits: int = 3) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


@zoo_app.command("build")
def build(
    dataset: Path = typer.Option(..., "--dataset", "-d", help="nnU-Net raw dataset folder DatasetXXX_Name."),
    grid: Path = typer.Option(..., "--grid", "-g", help="YAML/JSON grid of runs (see docs/zoo.md)."),
    zoo: Path = typer.Option(
        ..., "--zoo", "-z", help="Zoo folder (created if absent; a killed build resumes)."
    ),
    device: str = typer.Option("auto", help="auto | cpu | cuda[:i]."),
    parallel: int = typer.Option(
        None, help="Runs trained together in one batch (default 64 on CUDA, 8 on CPU)."
    ),
    mode: str = typer.Option("auto", help="auto | batched | sequential (auto: measured per device)."),
    executor: str = typer.Option("local", help="local | ray (fan runs out over a Ray cluster)."),
    address: str = typer.Option(None, help="Ray cluster address HOST:PORT (default: start a local Ray)."),
    fp16: bool = typer.Option(
        None, "--fp16/--fp32", help="New zoo: store weights as float16 (half the disk). (default: fp32)"
    ),
    shard: bool = typer.Option(
        None,
        "--shard/--no-shard",
        help="New zoo: one shard file per run, or one file per checkpoint. (default: shard)",
    ),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Train every run of the grid, saving its initialisation, N random checkpoints and its final state.

    Killed? Run the same command again: finished runs are kept, unfinished ones are trained again and
    the zoo ends with exactly the planned runs and checkpoints.
    """
    from weightzoo.zoo.build import build_zoo

    res = build_zoo(
        dataset,
        grid,
        zoo,
        device=device,
        parallel=parallel,
        executor=executor,
        address=address,
        mode=mode,
        dtype=None if fp16 is None else "float16" if fp16 else "float32",
        shard=shard,
        progress=progress,
        log=console.print,
    )
    modes = ", ".join(f"{n} {m}" for m, n in res.modes.items()) or "none"
    console.print(
        f"[bold]{res.zoo}[/]: {res.runs_planned} runs, {res.checkpoints_planned} checkpoints "
        f"({res.runs_skipped} runs were already done; trained {res.runs_trained}: {modes}; "
        f"{res.checkpoints_committed} checkpoints committed) in {res.seconds:.0f} s on {res.device}"
    )


@zoo_app.command("ls")
def ls(
    zoo: Path = typer.Argument(..., help="Zoo folder."),
    task: str = typer.Option(None, "--task", "-t", help="Only runs that learned this task."),
    site: str = typer.Option(None, "--site", "-s", help="Only runs trained on this site."),
    split: str = typer.Option(None, help="Only runs of this run split: train | val | test."),
    runs: bool = typer.Option(
        None, "--runs/--no-runs", help="List every run (default: when there are <= 40)."
    ),
) -> None:
    """Runs, checkpoints, validation Dice ranges per task and disk size."""
    from weightzoo.zoo.store import Zoo

    with Zoo(zoo) as z:
        every = z.runs()
        for kind, value, known in (
            ("task", task, sorted({t for r in every for t in r.tasks})),
            ("site", site, sorted({x for r in every for x in r.sites})),
            ("split", split, ["train", "val", "test"]),
        ):
            if value is not None and value not in known:  # "0 runs" would read as an answer
                from weightzoo.errors import UnknownNameError

                raise UnknownNameError(kind, value, known, zoo)
        s = z.summary(task=task, site=site, split=split)
        found = z.runs(task=task, site=site, split=split)
        table = Table(title=f"zoo {zoo} · by task", title_justify="left")
        for col in ("task", "runs", "checkpoints", "val Dice min", "val Dice max", "best checkpoint"):
            table.add_column(
                col,
                justify="left" if col in ("task", "best checkpoint") else "right",
                overflow="fold" if col == "best checkpoint" else "ellipsis",
            )
        for t, d in s["tasks"].items():
            best = z.checkpoints(task=t, site=site, split=split, order_by="-val_dice", limit=1)
            table.add_row(
                t,
                str(d["runs"]),
                str(d["checkpoints"]),
                _fmt(d["val_dice_min"]),
                _fmt(d["val_dice_max"]),
                best[0].ckpt_id if best and best[0].metric("val_dice", t) is not None else "–",
            )
        console.print(table)
        if runs or (runs is None and len(found) <= 40):
            rt = Table(title="runs", title_justify="left")
            for col in ("run", "tasks", "sites", "seed", "config", "split", "checkpoints", "best val Dice"):
                rt.add_column(
                    col,
                    justify="right" if col in ("seed", "checkpoints", "best val Dice") else "left",
                    overflow="fold" if col == "run" else "ellipsis",
                )
            for r in found:
                c = r.config
                cfg = (
                    f"{c.get('preset', '')} {c.get('optimizer', '')} lr {c.get('lr', '')} aug {c.get('augment', '')} "
                    f"{c.get('steps', '')} steps"
                    if r.source == "build"
                    else f"{r.source} {r.info.get('trainer_name', '')} fold {r.info.get('fold', '')}"
                )
                best = z.checkpoints(run_id=r.run_id, order_by="-val_dice", limit=1)
                dice = ", ".join(
                    f"{t} {_fmt(best[0].metric('val_dice', t))}"
                    for t in r.tasks
                    if best and t in best[0].metrics
                )
                rt.add_row(
                    r.run_id,
                    "+".join(r.tasks),
                    "+".join(r.sites) or "–",
                    "–" if r.seed is None else str(r.seed),
                    cfg,
                    r.split,
                    f"{r.n_checkpoints}/{r.n_planned}",
                    dice or "–",
                )
            console.print(rt)
        splits = ", ".join(f"{k} {v}" for k, v in sorted(s["splits"].items())) or "none"
        console.print(
            f"{s['runs']} runs ({s['runs_done']} done; run split: {splits}) · "
            f"{s['checkpoints']} of {s['checkpoints_planned']} checkpoints · data {_size(s['data_bytes'])} "
            f"({s['dtype']}, {'sharded' if s['sharded'] else 'one file per checkpoint'}) + manifest "
            f"{_size(s['manifest_bytes'])}"
        )


@zoo_app.command("verify")
def verify(zoo: Path = typer.Argument(..., help="Zoo folder.")) -> None:
    """Check every checksum and every manifest row against its file (exit 1 on any problem)."""
    from weightzoo.zoo.store import Zoo

    with Zoo(zoo) as z:
        rep = z.verify()
    for note in rep.notes:
        console.print(f"[yellow]note:[/] {note}")
    for p in rep.problems[:50]:
        console.print(f"[red]problem:[/] {p}")
    if len(rep.problems) > 50:
        console.print(f"... and {len(rep.problems) - 50} more problems")
    summary = f"{rep.n_checkpoints} checkpoints in {rep.n_files} files ({_size(rep.n_bytes)}) checked in {rep.seconds:.1f} s"
    if rep.ok:
        console.print(f"[green]ok[/]: {summary}")
        return
    console.print(f"[red]FAILED[/]: {len(rep.problems)} problem(s); {summary}")
    raise SystemExit(1)  # cli.main turns it into the exit code (typer.Exit would be swallowed)


@zoo_app.command("ingest")
def ingest(
    folder: Path = typer.Argument(
        ..., help="nnU-Net results folder, e.g. nnUNet_results/Dataset001_X/nnUNetTrainer__nnUNetPlans__2d."
    ),
    zoo: Path = typer.Option(..., "--zoo", "-z", help="Zoo folder (created if absent)."),
    split: str = typer.Option("train", help="Run split to record: train | val | test."),
    site: list[str] = typer.Option(
        None, "--site", "-s", help="Site(s) the models were trained on (repeatable)."
    ),
) -> None:
    """Add a lab's trained nnU-Net v2 models (every fold and checkpoint) to a zoo."""
    from weightzoo.zoo.exchange import ingest_results

    res = ingest_results(folder, zoo, split, list(site) if site else None)
    console.print(
        f"ingested {res['checkpoints']} checkpoint(s) of {res['runs']} run(s) into [bold]{zoo}[/]"
        + (f" ({res['skipped_runs']} run(s) were already there)" if res["skipped_runs"] else "")
    )


@zoo_app.command("export")
def export(
    source: Path = typer.Argument(
        ..., help="Zoo folder, or a model folder (net/, merged/, a trained model)."
    ),
    ckpt_id: str = typer.Argument(
        ...,
        metavar="CKPT_ID|OUT_DIR",
        help="Checkpoint id (see `zoo ls --runs`); for a model folder: OUT_DIR.",
    ),
    out_dir: Path = typer.Argument(None, help="nnU-Net results folder to write into (nnUNet_results)."),
    dataset: Path = typer.Option(
        None,
        "--dataset",
        "-d",
        help="Model folders: dataset whose label values to write (default: the model's own).",
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing export."),
) -> None:
    """Write a zoo checkpoint (ZOO CKPT_ID OUT_DIR) or a model folder (MODEL_DIR OUT_DIR) as an nnU-Net v2
    results folder that nnU-Net's predictor loads."""
    from weightzoo.errors import InputError
    from weightzoo.segmenter import MODEL_JSON
    from weightzoo.zoo.exchange import export_checkpoint, export_model_folder

    if (source / MODEL_JSON).is_file():
        if out_dir is not None:
            raise InputError(
                f"{source} is a model folder: give only an output folder",
                f"weightzoo zoo export {source} OUT_DIR",
            )
        out = Path(ckpt_id)
        path = export_model_folder(source, out, overwrite, dataset)
        what = str(source)
    else:
        if out_dir is None:
            raise InputError(
                f"{source} is not a model folder (no {MODEL_JSON}): a zoo needs a checkpoint id and an output folder",
                f"weightzoo zoo export {source} CKPT_ID OUT_DIR",
            )
        if dataset is not None:
            raise InputError("--dataset applies to model folders only", "drop --dataset")
        out = out_dir
        path = export_checkpoint(source, ckpt_id, out, overwrite)
        what = ckpt_id
    console.print(f"exported {what} to [bold]{path.parent.parent}[/] (nnUNet_results={out}, fold 0)")


@zoo_app.command("soup")
def soup(
    zoo: Path = typer.Option(..., "--zoo", "-z", help="Fine-tune zoo (a grid with `from:`)."),
    task: str = typer.Option(
        ..., "--task", "-t", help="Task set of the runs to average, comma-separated: cord or cord,gm,canal."
    ),
    site: str = typer.Option(..., "--site", "-s", help="Average runs trained on this site."),
    out: Path = typer.Option(..., "--out", "-o", help="Model folder to write."),
    greedy: bool = typer.Option(
        False, "--greedy", help="Greedy soup: keep a run only if it does not lower the val Dice."
    ),
    select_on: str = typer.Option("val", "--select-on", help="Subjects the soup is scored on: val only."),
    trainable: str = typer.Option(
        None, "--trainable", help="Only runs of this subset: all|decoder|norm_seg."
    ),
    base: str = typer.Option(None, "--base", help="Base id, when the runs come from several bases."),
    dataset: Path = typer.Option(
        None, "--dataset", "-d", help="Dataset with the validation subjects (default: the zoo's)."
    ),
) -> None:
    """Average the final checkpoints of fine-tunes of one base into ONE network (a model soup)."""
    from weightzoo.errors import InputError, UnknownNameError
    from weightzoo.zoo.soup import make_soup, save_soup
    from weightzoo.zoo.store import Zoo

    if select_on == "test":
        raise InputError(
            "--select-on test would tune the soup on the test subjects it is judged on",
            "use --select-on val (the default)",
        )
    if select_on != "val":
        raise UnknownNameError("selection split", select_on, ["val"])
    tasks = [t.strip() for t in task.split(",") if t.strip()]
    with Zoo(zoo) as z:
        res = make_soup(z, tasks, site, "greedy" if greedy else "uniform", trainable, dataset, base_id=base)
        save_soup(res, out)
    n = len(res.candidates.checkpoints)
    val = (
        f" · val Dice {', '.join(f'{t} {_fmt(v)}' for t, v in res.val_dice.items())}" if res.val_dice else ""
    )
    console.print(
        f"{res.method} soup of {len(res.chosen)}/{n} fine-tunes of {'+'.join(tasks)} on site {site} "
        f"(base {res.candidates.base_id}) → [bold]{out}[/]{val}"
    )


def register(app: typer.Typer) -> None:
    """Add the `zoo` command group to `app`."""
    app.add_typer(zoo_app, name="zoo")
