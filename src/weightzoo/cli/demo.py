"""`weightzoo demo`: the main job on built-in synthetic data."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table


def register(app: typer.Typer) -> None:
    @app.command()
    def demo(
        out: Path = typer.Option(
            Path("demo_out"), "--out", "-o", help="Output folder (data, models, summary.json, report.html)."
        ),
        steps: int = typer.Option(150, help="Training steps per task model (train-from-scratch route)."),
        routes: str = typer.Option(
            "zoo,delta,heads,incontext,prune,uncertainty,hyper",
            help="Later routes to add after train-from-scratch (comma-separated; '' for none; "
            "zoo, delta, generate, heads, incontext, prune, uncertainty, hyper).",
        ),
        tasks: str = typer.Option("cord,gm,canal,lesion", help="Comma-separated phantom tasks."),
        seed: int = typer.Option(0, help="Seed for the data and the training runs."),
        device: str = typer.Option("auto", help="auto | cpu | cuda"),
        quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
    ) -> None:
        """Phantoms → one small nnU-Net per task → test Dice on the training site and unseen sites → report.html."""
        from weightzoo.demo import DemoSettings, results_table, run_demo

        console = Console()
        settings = DemoSettings(
            tasks=tuple(t.strip() for t in tasks.split(",") if t.strip()),
            steps=steps,
            seed=seed,
            device=device,
            routes=tuple(r.strip() for r in routes.split(",") if r.strip()),
        )
        results = run_demo(out, settings, progress=not quiet, log=console.print)
        rows = results_table(results)
        table = Table(title=f"weightzoo demo — trained on site {settings.train_site}, test subjects only")
        for col in rows[0]:
            table.add_column(col, justify="left" if col == "task" else "right")
        for r in rows:
            table.add_row(*[f"{v:.3f}" if isinstance(v, float) else str(v) for v in r.values()])
        console.print(table)
        console.print(f"total {results['seconds_total']} s on {results['device']}")
        console.print(f"report: {out / 'report.html'}   summary: {out / 'summary.json'}")
