"""The `weightzoo` command line (typer + rich), in the spirit of `sct_deepseg TASK -i IMAGE`.

Each sub-module registers its commands on `app`. Errors caused by input are `WeightzooError`s: they are
printed as one line (`error: <file>: <what> — <fix>`) with exit code 2; `--debug` shows the traceback.
"""

from __future__ import annotations

import sys
import warnings

import typer
from rich.console import Console
from rich.markup import escape

from weightzoo.errors import WeightzooError, WeightzooWarning

app = typer.Typer(
    name="weightzoo",
    help="Segmentation models for a new task or site without a week of nnU-Net training.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err_console = Console(stderr=True)
_state = {"debug": False}


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks instead of one-line errors."),
) -> None:
    _state["debug"] = debug


# Command modules, in --help order. Each defines `register(app)`. A module that is not installed
# (a route still being built) is skipped; an import error inside one is raised, never hidden.
COMMAND_MODULES = (
    "data",
    "train",
    "base",
    "evaluate",
    "segment",
    "zoo",
    "generate",
    "heads",
    "incontext",
    "demo",
)


def _register() -> None:
    import importlib
    import importlib.util

    for name in COMMAND_MODULES:
        if importlib.util.find_spec(f"weightzoo.cli.{name}") is not None:
            importlib.import_module(f"weightzoo.cli.{name}").register(app)


_register()


def _show_warning(message, category, filename, lineno, file=None, line=None):  # type: ignore[no-untyped-def]
    """User-facing warnings as one yellow line; anything else as Python prints it."""
    if issubclass(category, WeightzooWarning):
        err_console.print(f"[yellow]warning:[/] {escape(str(message))}", highlight=False, soft_wrap=True)
    else:
        _python_showwarning(message, category, filename, lineno, file, line)


_python_showwarning = warnings.showwarning


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point: run the app, turning user errors into one-line messages."""
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    warnings.showwarning = _show_warning
    try:
        app(args=argv, standalone_mode=False)
    except WeightzooError as e:
        if debug:
            raise
        err_console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted[/] (long jobs resume from their last checkpoint when re-run)")
        return 130
    except SystemExit as e:
        return int(e.code or 0)
    except Exception as e:  # click usage errors carry their own exit codes
        import click

        if isinstance(e, click.exceptions.ClickException):
            e.show()
            return e.exit_code
        if isinstance(e, click.exceptions.Abort):
            return 1
        raise
    return 0


def run() -> None:
    sys.exit(main())
