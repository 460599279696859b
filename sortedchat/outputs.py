"""Where long commands write: checked before the work starts, and rescued if writing fails anyway.

`train`, `eval` and `bench` run for minutes to hours; an output path that cannot be written (a
directory where a file is meant, a file where a directory is meant, a read-only place) must fail
before the run, not after it. Should writing still fail at the end (a full disk, a mount gone away),
the results go to the user data dir and the error says where.
"""

from __future__ import annotations

import errno
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


# How torch.save's zip writer reports a write that failed (it does not say why; a full disk, mostly)
TORCH_WRITE_FAILED = re.compile(r"iostream error|unexpected pos \d+|PytorchStreamWriter failed|file write failed")


def write_error(exc: BaseException, folder: Path | None = None) -> str | None:
    """Why a write into `folder` failed ("No space left on device"), when `exc` is a failed write; else None.

    Not every library says so with an OSError: safetensors raises its `SafetensorError` ("... I/O error: No space
    left on device (os error 28)") and torch.save a RuntimeError that gives no reason ("unexpected pos ..."),
    for which a `folder` whose disk has no room left names the reason."""
    if isinstance(exc, OSError):
        if exc.strerror:
            return exc.strerror
        code = exc.args[0] if exc.args and isinstance(exc.args[0], int) else exc.errno
        return os.strerror(code) if code else str(exc) or type(exc).__name__
    text = str(exc).strip()
    found = re.search(r"I/O error: (.+?)(?: \(os error \d+\))?$", text)
    if type(exc).__name__ == "SafetensorError" and found:
        return found.group(1)
    if isinstance(exc, RuntimeError) and TORCH_WRITE_FAILED.search(text):
        return os.strerror(errno.ENOSPC) if folder is not None and _full(folder) else \
            f"torch could not write a file: {TORCH_WRITE_FAILED.search(text).group(0)}"
    return None


def _full(folder: Path) -> bool:
    """Whether the disk that holds `folder` (or its nearest existing parent) has less than 1 MB left."""
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        st = os.statvfs(folder)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < 1 << 20


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
