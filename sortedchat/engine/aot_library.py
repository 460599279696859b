"""Where `--compile`'s libraries live: compiled once per machine into the cache folder, loaded on later starts.

AOTInductor compiles the decoding step into a shared library for one model shape and layout of its inputs, one
instruction set and one thread count: `library` names each by all of that (and by the code that made it), writes it
whole under a temporary name and renames it (a crash or Ctrl+C leaves no half library under its real name), compiles
a damaged one again instead of failing on every start, and prunes those that older code made (never loaded again).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from sortedchat import __version__

PREFIX = "decode-"
STALE_TEMPORARY_S = 3600  # an unfinished library this old was left by a process that died compiling it


def library(code: bytes, key: tuple, build: Callable[[str], None]):
    """The loaded library that `build(path)` compiles to `path`, for `code` (the source it compiles) and `key` (all
    else it depends on): from the cache folder, or built into it."""
    from sortedchat.paths import cache_dir

    folder = cache_dir() / "packages"
    version = _digest(code + torch.__version__.encode() + __version__.encode())[:8]
    path = folder / f"{PREFIX}{version}-{_digest(repr((key, machine())).encode())[:24]}.pt2"
    if path.exists():
        try:
            return torch._inductor.aoti_load_package(str(path))
        except Exception:  # a damaged file (a full disk, a copy cut short): compiled again below
            path.unlink(missing_ok=True)
    folder.mkdir(parents=True, exist_ok=True)
    _prune(folder, version)
    handle, temporary = tempfile.mkstemp(dir=folder, prefix=f".{PREFIX}", suffix=".pt2")
    os.close(handle)
    try:
        build(temporary)
        os.replace(temporary, path)
    finally:
        Path(temporary).unlink(missing_ok=True)
    return torch._inductor.aoti_load_package(str(path))


def machine() -> tuple:
    """What a library's kernels are made for besides the model: the CPU (instruction set, model name), the thread
    count, and the GPU where one is present."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        cpu += next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if "model name" in line), "")
    gpu = None
    if torch.cuda.is_available():
        gpu = (torch.cuda.get_device_name(), torch.cuda.get_device_capability(), torch.version.cuda)
    return torch.backends.cpu.get_cpu_capability(), cpu, torch.get_num_threads(), gpu


def _prune(folder: Path, version: str) -> None:
    """Remove the libraries older code made and the temporaries of compiles that died long ago."""
    for old in folder.glob(f"{PREFIX}*.pt2"):
        if not old.name.startswith(f"{PREFIX}{version}-"):
            old.unlink(missing_ok=True)
    for unfinished in folder.glob(f".{PREFIX}*.pt2"):
        with contextlib.suppress(OSError):
            if time.time() - unfinished.stat().st_mtime > STALE_TEMPORARY_S:
                unfinished.unlink()


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
