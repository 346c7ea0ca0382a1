"""`weightzoo generate train|sample|eval` (weights from a diffusion model trained on a zoo) and
`weightzoo merge` (one network for several tasks by merging the zoo's specialists)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import typer
from rich.console import Console

console = Console(highlight=False)
gen_app = typer.Typer(
    help="Generate trained segmentation weights with a diffusion model trained on a checkpoint zoo.",
    no_args_is_help=True,
)


def _tasks(value: str) -> list[str]:
    return [t.strip() for t in value.split(",") if t.strip()]


def _targets(value: str, tasks: list[str]) -> dict[str, float]:
    """'0.9' (every task) or 'cord=0.95,gm=0.8' -> {task: Dice}."""
    from weightzoo.errors import InputError

    try:
        if "=" not in value:
            return {t: float(value) for t in tasks}
        out = {}
        for part in value.split(","):
            k, v = part.split("=")
            out[k.strip()] = float(v)
        return out
    except ValueError:
        raise InputError(
            f"--target-dice '{value}' is not a number or TASK=DICE list", "e.g. 0.95 or cord=0.95,gm=0.8"
        ) from None


def _dataset_of(zoo: Any, name: str | None) -> Path | None:
    """The dataset folder a zoo recorded for `name` (None if unknown or gone)."""
    import json

    if name is None:
        return None
    row = zoo.db.execute("SELECT info FROM datasets WHERE name = ?", (name,)).fetchone()
    path = json.loads(row[0]).get("path") if row and row[0] else None
    return Path(path) if path and Path(path).is_dir() else None


@gen_app.command("train")
def train(
    zoo: Path = typer.Option(..., "--zoo", "-z", help="Zoo folder (`weightzoo zoo build`)."),
    out: Path = typer.Option(..., "--out", "-o", help="Generator folder to write (gen/)."),
    preset: str = typer.Option("tiny", help="Generator size: tiny (CPU, tests) | small | default (GPU)."),
    steps: int = typer.Option(None, help="Training steps. (default: the preset's)"),
    batch_size: int = typer.Option(None, "--batch-size", help="Pairs per step. (default: the preset's)"),
    lr: float = typer.Option(None, help="AdamW learning rate. (default: the preset's)"),
    encoder: str = typer.Option(None, help="Token encoder: shared (with layer embeddings) | per_layer."),
    permute: float = typer.Option(
        None, help="Probability of permutation augmentation per pair. (default 0.5)"
    ),
    seed: int = typer.Option(0, help="Random seed; same seed, same generator."),
    net_arch: str = typer.Option(
        None, "--net-arch", help="Zoo architecture (body hash) if the zoo holds several."
    ),
    device: str = typer.Option("auto", help="auto | cpu | cuda."),
    resume: bool = typer.Option(True, "--resume/--no-resume", help="Continue from the folder's checkpoint."),
    force: bool = typer.Option(False, "--force", help="Overwrite whatever the --out folder holds."),
) -> None:
    """Train a generator on the zoo's TRAINING runs (pairs of checkpoints of one run, earlier -> later).

    Killed? Run the same command again: it resumes from its last checkpoint.
    """
    from weightzoo.generate.train import GenTrainConfig, train_generator

    opts = {
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "encoder": encoder,
        "permute": permute,
        "net_arch": net_arch,
    }
    cfg = GenTrainConfig.from_dict(
        {"preset": preset, "seed": seed, "device": device, **{k: v for k, v in opts.items() if v is not None}}
    )
    res = train_generator(zoo, out, cfg, resume=resume, force=force, log=console.print)
    if res.skipped:
        console.print(f"{out} already holds this finished generator; use --force to retrain")
        return
    last = res.history[-1] if res.history else {}
    console.print(
        f"generator written to [bold]{out}[/] ({res.meta['n_params']:,} parameters, {res.steps} steps, "
        f"{res.seconds:.0f} s on {res.meta['device']}) · final loss {last.get('loss', math.nan):.4f}"
    )


@gen_app.command("sample")
def sample(
    generator: Path = typer.Option(..., "--generator", "-g", help="Generator folder (`generate train`)."),
    task: str = typer.Option(
        ..., "--task", "-t", help="Task(s), comma-separated: cord or cord,gm,canal (one output each)."
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Model folder to write (segment/evaluate accept it)."),
    target_dice: str = typer.Option(..., "--target-dice", help="Target val Dice: 0.95, or cord=0.95,gm=0.8."),
    site: str = typer.Option(None, "--site", "-s", help="Site to condition on (default: any site)."),
    from_init: int = typer.Option(
        None, "--from-init", help="Start from a fresh initialisation with this seed."
    ),
    from_ckpt: str = typer.Option(None, "--from", help="Start from a zoo checkpoint id or a model folder."),
    current_dice: str = typer.Option(
        None, "--current-dice", help="The start's val Dice, if it is not recorded."
    ),
    steps: int = typer.Option(1, help="Recursive prompting: feed the output back this many times."),
    ddim_steps: int = typer.Option(10, "--ddim-steps", help="Denoising steps per prompt."),
    candidates: int = typer.Option(1, help="Networks drawn in one batch."),
    select_on: str = typer.Option(
        None, "--select-on", help="val: keep the candidate with the best validation Dice."
    ),
    dataset: Path = typer.Option(
        None, "--dataset", "-d", help="Dataset for --select-on (default: the zoo's)."
    ),
    zoo: Path = typer.Option(None, "--zoo", "-z", help="Zoo for --from CKPT_ID (default: the generator's)."),
    seed: int = typer.Option(0, help="Sampling seed (noise; also the init seed unless --from-init)."),
    device: str = typer.Option("auto", help="auto | cpu | cuda."),
) -> None:
    """Generate a trained network in one step (or k recursive steps) and write a model folder."""
    from weightzoo.errors import InputError
    from weightzoo.generate.sample import Generator, Start, select_on_val
    from weightzoo.zoo.store import Zoo

    gen = Generator.load(generator, device)
    tasks = gen.check_tasks(_tasks(task))
    target = _targets(target_dice, tasks)
    if from_init is not None and from_ckpt is not None:
        raise InputError("both --from-init and --from were given", "start from one of them")
    zoo_obj = None
    if from_ckpt is not None and not Path(from_ckpt).is_dir():
        zoo_obj = Zoo(zoo or gen.meta["zoo"])
        start = Start.from_zoo(zoo_obj, from_ckpt)
    elif from_ckpt is not None:
        start = Start.from_model(from_ckpt)
    else:
        start = Start.from_init(seed if from_init is None else from_init)
    current = _targets(current_dice, tasks) if current_dice else None
    res = gen.sample(tasks, target, site, start, candidates, steps, ddim_steps, seed, current)
    pick, info = 0, {}
    if select_on is not None:
        if select_on != "val":
            raise InputError(
                f"--select-on {select_on}: selection is on the validation split only", "use --select-on val"
            )
        ds_path = dataset
        if ds_path is None:
            zoo_obj = zoo_obj or Zoo(zoo or gen.meta["zoo"])
            ds_path = _dataset_of(zoo_obj, gen.meta.get("dataset"))
        if ds_path is None:
            raise InputError("--select-on val needs the dataset", "give --dataset data/DatasetXXX_Name")
        sel = select_on_val(gen, res, ds_path, [site] if site else None)
        pick, info = sel.index, {"selected_on": "val", "val_dice_candidates": sel.val_dice}
    info.update(
        target_dice=res.target,
        site=res.site or "any",
        start=res.start,
        steps=res.steps,
        ddim_steps=res.ddim_steps,
        seed=res.seed,
        candidates=candidates,
        candidate=pick,
        sample_seconds=res.seconds,
    )
    gen.save(res.vectors[pick], tasks, out, res.seconds, info)
    chosen = info.get("val_dice_candidates", [None])[pick] if select_on else None
    extra = f" · val Dice {', '.join(f'{t} {v:.3f}' for t, v in chosen.items())}" if chosen else ""
    console.print(
        f"generated [bold]{', '.join(tasks)}[/] network (target {', '.join(f'{t} {v:.2f}' for t, v in res.target.items())}, "
        f"site {site or 'any'}, from {res.start}) in {res.seconds:.2f} s → [bold]{out}[/]{extra}"
    )


@gen_app.command("eval")
def evaluate(
    generator: list[Path] = typer.Option(
        ..., "--generator", "-g", help="Generator folder (repeat for several seeds)."
    ),
    zoo: Path = typer.Option(..., "--zoo", "-z", help="The zoo the generators were trained on."),
    dataset: Path = typer.Option(
        ..., "--dataset", "-d", help="The zoo's dataset (its TEST split is scored)."
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for summary.json and report.html."),
    candidates: int = typer.Option(8, help="Candidates for best-of-N selection on val."),
    ddim_steps: int = typer.Option(10, "--ddim-steps", help="Denoising steps per prompt."),
    parts: str = typer.Option(
        "best,alignment,general,multitask,time", help="Parts to run (time trains one network from scratch)."
    ),
    device: str = typer.Option("cpu", help="cpu | cuda | auto: where to sample, score and time training."),
) -> None:
    """Evaluate generators: vs the zoo's best checkpoint, prompt alignment, generalisation, multi-task, time."""
    from weightzoo.generate.evaluate import evaluate_generators, fmt

    res = evaluate_generators(
        generator,
        zoo,
        dataset,
        out,
        candidates,
        ddim_steps,
        parts=_tasks(parts),
        log=console.print,
        device=device,
    )
    for r in res.get("best", []):
        console.print(
            f"{r['task']:>8} @ {r['site']}: zoo best test Dice {r['zoo best test']:.3f} · generated one-shot "
            f"{fmt(r['generated one-shot'])} · from the best checkpoint {fmt(r[next(k for k in r if k.startswith('from'))])}"
        )
    console.print(f"report: [bold]{out / 'report.html'}[/]")


def register(app: typer.Typer) -> None:
    """Add the `generate` command group and the `merge` command to `app`."""
    app.add_typer(gen_app, name="generate")

    @app.command("merge")
    def merge(
        zoo: Path = typer.Option(
            ..., "--zoo", "-z", help="Zoo with single-task runs of each task (one seed)."
        ),
        tasks: str = typer.Option(
            ..., "--tasks", "-t", help="Tasks to merge, comma-separated: cord,gm,canal."
        ),
        method: str = typer.Option("ties", help="average | task-arithmetic | ties."),
        out: Path = typer.Option(..., "--out", "-o", help="Model folder to write."),
        site: str = typer.Option(None, "--site", "-s", help="Use specialists trained on this site."),
        seed: int = typer.Option(None, help="Use specialists of this seed (default: the best group on val)."),
        lam: float = typer.Option(
            None, "--lambda", help="Scale of the task vectors (default: chosen on val)."
        ),
        density: float = typer.Option(0.2, help="TIES: fraction of each task vector kept."),
        dataset: Path = typer.Option(
            None, "--dataset", "-d", help="Dataset whose val split picks λ (default: the zoo's)."
        ),
    ) -> None:
        """Merge the zoo's single-task specialists into ONE network with an output per task."""
        from weightzoo.data.slices import Preprocessing
        from weightzoo.generate.merge import merge_zoo, save_merged
        from weightzoo.zoo.store import Zoo

        z = Zoo(zoo)
        task_list = _tasks(tasks)
        runs = z.runs(task=task_list[0]) if task_list else []
        ds_path = dataset or (_dataset_of(z, runs[0].dataset) if runs else None)
        info = runs[0].info.get("preprocessing") if runs else None
        prep = Preprocessing.from_dict(info) if info else _prep_from_config(runs[0].config if runs else {})
        res = merge_zoo(z, task_list, method, site, seed, lam, density, ds_path, prep)
        info_out = {"zoo": str(zoo.resolve()), "dataset": runs[0].dataset if runs else None}
        if ds_path is not None:
            info_out["dataset_path"] = str(Path(ds_path).resolve())
        save_merged(res, out, prep, info_out)
        val = (
            f" · val Dice {', '.join(f'{t} {v:.3f}' for t, v in res.val_dice.items())}"
            if res.val_dice
            else ""
        )
        lam_s = f" λ={res.lam:g}" if res.lam is not None else ""
        console.print(
            f"merged {', '.join(task_list)} ({method}{lam_s}, seed {res.specialists.seed}) → [bold]{out}[/]{val}"
        )


def _prep_from_config(cfg: dict[str, Any]) -> Any:
    from weightzoo.data.slices import Preprocessing

    return Preprocessing(
        cfg.get("normalization", "zscore"), tuple(cfg.get("size", (64, 64))), int(cfg.get("axis", 2)), 1
    )
