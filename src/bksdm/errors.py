"""User-facing errors, and the one place where foreign exceptions become them.

Anything a user can fix (a wrong name, a missing folder, a bad config key, a corrupt file) raises
:class:`UserError`; the CLI prints its message on one line and exits with code 2, without a traceback.
Loaders wrap their reads in :func:`reading`, so a truncated weight file or an invalid JSON names the file and
what to do instead of ending in a library's traceback.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


class UserError(Exception):
    """A problem in the user's input, with a message that says what to do about it."""


USER_ERROR_EXIT = 2


def short(exc: BaseException, limit: int = 160) -> str:
    """``Type: first line of the message``, cut to ``limit`` characters (messages must stay one line)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


@contextmanager
def reading(path: str | Path, what: str, fix: str = "replace it with a complete copy") -> Iterator[None]:
    """Turn any failure while reading ``path`` (truncated safetensors, invalid JSON, weights that do not fit their
    config, a missing file) into a one-line :class:`UserError` naming the file, the cause and ``fix``."""
    try:
        yield
    except UserError:
        raise
    except Exception as exc:
        raise UserError(f"{what} {path} cannot be read ({short(exc)}); {fix}") from None


def check_output(path: str | Path, kind: str = "folder") -> Path:
    """Fail before any work when ``path`` cannot become a ``folder`` or ``file`` output: an existing entry of the
    other kind, or a place whose nearest existing parent is not a writable folder."""
    p = Path(path).expanduser()
    if p.exists():
        if kind == "folder" and not p.is_dir():
            raise UserError(f"output {p} is an existing file; pass a folder path for --out")
        if kind == "file" and p.is_dir():
            raise UserError(f"output {p} is an existing folder; pass a file path for --out")
    parent = p if kind == "folder" and p.is_dir() else p.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"output {p} cannot be created: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"output {p} cannot be created: {parent} is not writable")
    return p


_NOTED: set[str] = set()


def note(message: str) -> None:
    """One line to standard error about a decision made for the user (a column read under another name, samples
    grouped another way, a statistic of few images), so nothing is altered silently: ``bksdm: note: ...``. The
    same message is printed once per process (a source reopened per epoch, a metric per checkpoint)."""
    import sys

    if message not in _NOTED:
        _NOTED.add(message)
        print(f"bksdm: note: {message}", file=sys.stderr)


def reset_notes() -> None:
    """Print every note again (a new run in the same process: tests, notebooks)."""
    _NOTED.clear()
