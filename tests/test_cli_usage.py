"""Every usage error of every command is one line naming the fix, with exit code 2, never a traceback.

The table is built from the CLI itself (every leaf command typer registers), so a new command is
covered the day it is added: an unknown option, each required option left out, each integer and
float option given a word, and typo'd subcommands.
"""

from __future__ import annotations

import pytest
import typer.main

from weightzoo.cli import app, main


def _leaves() -> list[tuple[list[str], object]]:
    out = []

    def walk(cmd: object, path: list[str]) -> None:
        subs = getattr(cmd, "commands", None)
        if subs:
            for name, sub in subs.items():
                walk(sub, [*path, name])
        else:
            out.append((path, cmd))

    walk(typer.main.get_command(app), [])
    return out


LEAVES = _leaves()


def _cases() -> list[tuple[str, list[str]]]:
    cases = []
    for path, cmd in LEAVES:
        name = " ".join(path)
        cases.append((f"{name}: unknown option", [*path, "--no-such-option"]))
        params = [p for p in cmd.params if getattr(p, "opts", None) and p.opts[0].startswith("--")]
        required = [p for p in params if p.required]
        if required:
            cases.append((f"{name}: nothing given", list(path)))
        for p in params:
            bare = getattr(p, "bare_type", None)
            kind = str(bare()) if callable(bare) else str(getattr(getattr(p, "type", None), "name", ""))
            if kind in ("int", "float", "integer"):
                cases.append((f"{name}: {p.opts[0]} abc", [*path, p.opts[0], "abc"]))
    cases.append(("typo'd command", ["trian"]))
    cases.append(("typo'd subcommand", ["zoo", "bild"]))
    cases.append(("option of another command", ["segment", "--steps", "3"]))
    return cases


CASES = _cases()


def test_the_table_covers_every_command() -> None:
    assert len(LEAVES) >= 25, [" ".join(p) for p, _ in LEAVES]
    covered = {c[0].split(":")[0] for c in CASES}
    assert all(" ".join(p) in covered for p, _ in LEAVES)


@pytest.mark.parametrize("argv", [c[1] for c in CASES], ids=[c[0] for c in CASES])
def test_usage_error_is_one_line_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2, (rc, err)
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error:") and "--help" in err, err


def test_every_source_folder_is_a_package() -> None:
    """setuptools' `find` (not namespace) packs only folders with an __init__.py: without one, a plain
    `pip install` would silently leave a route out (prune/ and uncertainty/ once did)."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "src" / "weightzoo"
    folders = {p.parent for p in root.rglob("*.py")}
    assert all((f / "__init__.py").exists() for f in folders), sorted(
        str(f) for f in folders if not (f / "__init__.py").exists()
    )
