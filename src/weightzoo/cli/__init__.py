"""The `weightzoo` command line (typer + rich), in the spirit of `sct_deepseg TASK -i IMAGE`.

Each sub-module registers its commands on `app`. Errors caused by input are `WeightzooError`s: they are
printed as one line (`error: <file>: <what> — <fix>`) with exit code 2; `--debug` shows the traceback.
"""

from __future__ import annotations

import os
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
    "prune",
    "hyper",
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
        err_console.print(
            f"[yellow]warning:[/] {escape(one_line(str(message)))}", highlight=False, soft_wrap=True
        )
    else:
        _python_showwarning(message, category, filename, lineno, file, line)


_python_showwarning = warnings.showwarning


LINE_BREAKS = "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"  # what str.splitlines splits on
_ESCAPED = {ord(c): repr(c)[1:-1] for c in LINE_BREAKS}


def one_line(text: str) -> str:
    """`text` with every line-breaking character written as an escape (\\n, \\x1e, ...): a name read
    from a file cannot break an error message in two."""
    return text.translate(_ESCAPED)


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point: run the app, turning user errors into one-line messages."""
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    warnings.showwarning = _show_warning
    if int(os.environ.get("RANK", "0") or 0) > 0 and int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - torchrun's other ranks: rank 0 reports; errors still show
    try:
        app(args=argv, standalone_mode=False)
    except WeightzooError as e:
        if debug:
            raise
        err_console.print(f"[bold red]error:[/] {escape(one_line(str(e)))}", highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted[/] (long jobs resume from their last checkpoint when re-run)")
        return 130
    except SystemExit as e:
        return int(e.code or 0)
    except Exception as e:
        usage, abort = _click_exceptions()
        if type(e).__name__ == "NoArgsIsHelpError":  # a group without a subcommand: its help
            e.show()  # type: ignore[attr-defined]
            return 2
        if isinstance(e, usage) and not debug:  # an unknown option, a missing or mistyped value, ...
            ctx = getattr(e, "ctx", None)
            where = ctx.command_path if ctx is not None else "weightzoo"
            message = " ".join(e.format_message().split())
            err_console.print(
                f"[bold red]error:[/] {escape(message)} — see `{escape(where)} --help`",
                highlight=False,
                soft_wrap=True,
            )
            return 2
        if isinstance(e, abort):
            return 1
        raise
    return 0


def _click_exceptions() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """(ClickException, Abort) classes of click AND of the click that typer vendors (typer._click):
    typer raises its own, which `click.exceptions.ClickException` does not match."""
    import importlib

    usage, abort = [], []
    for name in ("click.exceptions", "typer._click.exceptions"):
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        usage.append(mod.ClickException)
        if hasattr(mod, "Abort"):
            abort.append(mod.Abort)
    return tuple(usage), tuple(abort)


def run() -> None:
    sys.exit(main())
