"""Options shared by the commands that train (one definition, the same help everywhere)."""

from __future__ import annotations

import typer

BATCH_SIZE = typer.Option(None, "--batch-size", help="Slices per batch. (default: 16)")
SEED = typer.Option(None, help="Random seed. (default: 0)")
SIZE = typer.Option(None, help="Slices are resized to SIZE x SIZE. (default: 64)")
DEVICE = typer.Option(None, help="auto | cpu | cuda. (default: auto)")
CONFIG = typer.Option(None, "--config", "-c", help="YAML/JSON training config; options override it.")
RESUME = typer.Option(True, "--resume/--no-resume", help="Continue an interrupted run.")
PROGRESS = typer.Option(True, "--progress/--no-progress", help="Show progress bars.")
