"""Where long commands write: checked before the work starts, and rescued if writing fails anyway.

`train`, `eval` and `bench` run for minutes to hours; an output path that cannot be written (a
directory where a file is meant, a file where a directory is meant, a read-only place) must fail
before the run, not after it. Should writing still fail at the end (a full disk, a mount gone away),
the results go to the user data dir and the error says where.
"""

from __future__ import annotations

import os
import re
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from sortedchat import SortedChatError
from sortedchat.paths import data_dir


def _probe(path: Path, folder: Path, flag: str) -> None:
    """Create and remove a file in `folder` or its nearest existing parent (root bypasses permission bits,
    so only trying tells); nothing is left behind. Errors name `path`, the user's output."""
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise SortedChatError(f"{flag} {path}: {folder} is a file, not a folder")
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".sortedchat-probe-")
        os.close(fd)
        os.unlink(tmp)
    except OSError as exc:
        raise SortedChatError(f"{flag} {path}: cannot write there ({exc.strerror or exc})") from None


def check_output_file(path: Path | str, flag: str) -> Path:
    """`path` is a file this process can create or replace."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise SortedChatError(f"{flag} {path}: is a directory; give a file name")
    _probe(path, path.parent, flag)
    return path


def check_output_dir(path: Path | str, flag: str) -> Path:
    """`path` is a directory (existing or not) this process can write into."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise SortedChatError(f"{flag} {path}: is a file, not a directory")
    _probe(path, path, flag)
    return path


def write_error(exc: BaseException) -> str | None:
    """Why a write failed ("No space left on device"), when `exc` is a failed write; None for anything else.

    safetensors reports a full disk as its own `SafetensorError` ("... I/O error: No space left on device (os
    error 28)"), not as an OSError, so both are recognised here."""
    if isinstance(exc, OSError):
        if exc.strerror:
            return exc.strerror
        code = exc.args[0] if exc.args and isinstance(exc.args[0], int) else exc.errno
        return os.strerror(code) if code else str(exc) or type(exc).__name__
    found = re.search(r"I/O error: (.+?)(?: \(os error \d+\))?$", str(exc).strip())
    return found.group(1) if type(exc).__name__ == "SafetensorError" and found else None


def write_or_rescue(path: Path, flag: str, write: Callable[[Path], Path]) -> Path:
    """`write(path)`; if that fails, `write` into the user data dir and raise an error saying where."""
    try:
        return write(path)
    except Exception as exc:
        reason = write_error(exc)
        if reason is None:
            raise
        rescue = data_dir() / "results" / f"{time.strftime('%Y%m%d-%H%M%S')}-{path.name}"
        write(rescue)
        raise SortedChatError(f"{flag} {path}: cannot write ({reason}); the results are in {rescue}") from None
