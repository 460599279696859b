"""A GGUF file's layer count from its header, in milliseconds.

`gguf.GGUFReader` maps every tensor first (seconds for the default model on a busy machine), and the
command line only needs one number before loading: `{architecture}.block_count`, which the header's
key/value list holds near its start. The format: magic "GGUF", version, tensor count, key/value count,
then keys (length-prefixed UTF-8) each with a typed value.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import BinaryIO

# value type -> struct format of one scalar; 8 = string, 9 = array (read apart)
SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def _read(fh: BinaryIO, fmt: str):
    size = struct.calcsize(fmt)
    data = fh.read(size)
    if len(data) != size:
        raise ValueError("the GGUF header ends early")
    return struct.unpack(fmt, data)[0]


def _string(fh: BinaryIO) -> str:
    n = _read(fh, "<Q")
    return fh.read(n).decode("utf-8", errors="replace")


def _value(fh: BinaryIO, kind: int):
    if kind in SCALARS:
        return _read(fh, SCALARS[kind])
    if kind == 8:
        return _string(fh)
    if kind == 9:
        item, count = _read(fh, "<I"), _read(fh, "<Q")
        if item in SCALARS:  # skip without decoding
            fh.seek(count * struct.calcsize(SCALARS[item]), 1)
        else:
            for _ in range(count):
                _value(fh, item)
        return None
    raise ValueError(f"unknown GGUF value type {kind}")


def gguf_block_count(path: Path) -> int | None:
    """The number of transformer blocks the file declares, or None if it declares none."""
    with open(path, "rb") as fh:
        if fh.read(4) != b"GGUF":
            raise ValueError("not a GGUF file")
        _read(fh, "<I")  # version
        _read(fh, "<Q")  # tensor count
        arch = None
        for _ in range(_read(fh, "<Q")):
            key = _string(fh)
            value = _value(fh, _read(fh, "<I"))
            if key == "general.architecture":
                arch = value
            elif arch is not None and key == f"{arch}.block_count":
                return int(value)
    return None
