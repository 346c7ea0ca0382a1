"""User-facing errors: one line that names the file (or thing) and the fix.

Everything the CLI can show a user is a `WeightzooError`; the CLI prints `str(err)` and exits 2
(the traceback only with `--debug`). Library code raises these instead of letting a deep
nibabel/torch/KeyError escape, so a bad input never surfaces as a stack trace.
"""

from __future__ import annotations

from pathlib import Path


class WeightzooError(Exception):
    """An error caused by the user's input, with a message that says what to do."""

    def __init__(self, what: str, fix: str | None = None, path: str | Path | None = None):
        self.what, self.fix, self.path = what, fix, path
        msg = f"{path}: {what}" if path is not None else what
        if fix:
            msg += f" — {fix}"
        super().__init__(msg)


class InputError(WeightzooError):
    """A file is missing, unreadable, or inconsistent with its partner (image/mask)."""


class ModelError(WeightzooError):
    """A model folder or checkpoint is missing, corrupt, or of another architecture."""


class UnknownNameError(WeightzooError):
    """An unknown task, site, preset or method; the message lists the known ones."""

    def __init__(
        self, kind: str, name: str, known: list[str] | tuple[str, ...], path: str | Path | None = None
    ):
        known_s = ", ".join(sorted(map(str, known))) or "(none)"
        super().__init__(f"unknown {kind} '{name}'", f"choose one of: {known_s}", path)


class WeightzooWarning(UserWarning):
    """Something the user should know although a result is still produced (a repaired mask, an
    unknown site falling back to the universal head). The CLI prints these as one yellow line."""


def require_file(path: str | Path, what: str = "file", fix: str | None = None) -> Path:
    """Return `path` as a Path if it exists, else raise a one-line InputError."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{what} not found", fix or "check the path", p)
    return p
