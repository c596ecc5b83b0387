"""What every module needs and none of torch: the user-error exception, durable atomic file writes,
file hashes, and the metrics log a resumed run rewinds.

Kept apart from common.py (device and precision policy, which imports torch) so that the data
pipeline's worker processes, which import only this, start in a fraction of a second instead of
the ~1.2 s a torch import costs them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import sys
from pathlib import Path


class LmforgeError(Exception):
    """A user's mistake or an unusable input. The CLI prints its message on one line, no traceback.

    The message names the input and says how to fix it.
    """


def fsync_file(path: str | os.PathLike) -> None:
    """Push a file's data to the disk. fsync flushes the file itself, whichever descriptor asks."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: str | os.PathLike) -> None:
    """Push a folder's entries (names created, renamed or removed in it) to the disk: without it a
    rename can be lost in a power cut even though the renamed file's data was synced. Windows cannot
    open a folder; its renames are journaled, so there it does nothing."""
    if os.name == "nt":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# optional modules -> the extra of pyproject.toml that installs them (pip install 'lmforge[EXTRA]')
EXTRAS = {"ray": "ray", "fasttext": "langid"}


def missing_module(name: str, purpose: str | None = None) -> str:
    """The one line for a module that is not installed: what needs it and the pip command that installs it."""
    top = name.partition(".")[0]
    fix = (f"pip install 'lmforge[{EXTRAS[top]}]'" if top in EXTRAS
           else f"pip install {top} (or reinstall lmforge, which brings its dependencies)")
    what = f"{purpose} needs {top!r}, which is not installed" if purpose else \
        f"the Python module {top!r} is not installed"
    return f"{what}: {fix}"


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write through a temporary file in the same folder, fsync it, rename it over `path` and fsync the
    folder: a crash leaves the old file or the new one, never half a file, and a completed call survives
    a power cut."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    # not tempfile.mkstemp: its 0600 would stay on the file; 0666 less the umask is what open() gives
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_metrics(path: str | os.PathLike) -> tuple[list[tuple[dict, str]], int]:
    """The records of a JSONL metrics log, each with its line, and how many lines were unreadable.
    A run killed mid-write leaves a cut last line: it is counted and skipped, not fatal."""
    path = Path(path)
    if not path.exists():
        return [], 0
    records, unreadable = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append((record, line))
        else:
            unreadable += 1
    return records, unreadable


def rewind_metrics(path: str | os.PathLike, step: int) -> None:
    """On resume, keep only the metrics up to the checkpoint's step (the rest is logged again), rewritten
    atomically; unreadable lines (a cut last line) are dropped and counted on stderr."""
    records, unreadable = read_metrics(path)
    if unreadable:
        print(f"warning: {path}: dropped {unreadable} unreadable line{'s' if unreadable > 1 else ''} "
              "(a run killed while writing leaves its last line cut)", file=sys.stderr)
    atomic_write_text(path, "".join(f"{line}\n" for record, line in records if record["step"] <= step))
