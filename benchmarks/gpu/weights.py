"""Carry a file too large for one GPU-machine command in parts, each checked by sha256 on arrival.

The GPU machine takes 64 MiB per command, the working tree included (benchmarks/gpu/README.md), and keeps
ignored files only while it stays warm between commands. So the default model's GGUF travels in parts,
one per command, listed in a manifest (`<part name> <bytes> <sha256>` per line, then `= <file name> <bytes>
<sha256>` for the whole). Each command checks every part it expects to find already there: a part that is
missing or different means the machine went cold in between, and the command says so and stops (exit 3)
instead of failing later.

    python benchmarks/gpu/weights.py split FILE DIR --part-mib 40 --manifest M   # here
    python benchmarks/gpu/weights.py check DIR --manifest M --parts 2           # there: parts 1..2 present?
    python benchmarks/gpu/weights.py join DIR DEST --manifest M                 # there: all parts -> DEST
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import typer

COLD = 3  # exit status: a part sent by an earlier command is gone (the machine went cold)
app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


def sha256(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def read_manifest(manifest: Path) -> tuple[list[tuple[str, int, str]], tuple[str, int, str]]:
    parts, whole = [], None
    for n, line in enumerate(manifest.read_text().splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) == 4 and fields[0] == "=":
            whole = (fields[1], int(fields[2]), fields[3])
        elif len(fields) == 3:
            parts.append((fields[0], int(fields[1]), fields[2]))
        else:
            raise SystemExit(f"{manifest}:{n}: expected '<part> <bytes> <sha256>' or '= <file> <bytes> <sha256>'")
    if whole is None or not parts:
        raise SystemExit(f"{manifest}: no parts, or no '= <file> <bytes> <sha256>' line")
    return parts, whole


def fail(message: str, code: int = 1) -> None:
    print(f"weights: {message}", file=sys.stderr)
    raise typer.Exit(code)


@app.command()
def split(src: Path, directory: Path, manifest: Path = typer.Option(..., "--manifest"),
          part_mib: float = typer.Option(40.0, "--part-mib", help="Size of every part but the last")) -> None:
    """Cut SRC into parts of --part-mib in DIR, and write their manifest."""
    size = int(part_mib * 2**20)
    directory.mkdir(parents=True, exist_ok=True)
    lines = []
    with open(src, "rb") as fh:
        for i in range(1, 100):
            block = fh.read(size)
            if not block:
                break
            name = f"{src.name}.part{i}"
            (directory / name).write_bytes(block)
            lines.append(f"{name} {len(block)} {hashlib.sha256(block).hexdigest()}")
    lines.append(f"= {src.name} {src.stat().st_size} {sha256(src)}")
    manifest.write_text("\n".join(lines) + "\n")
    print(f"{src.name}: {len(lines) - 1} parts in {directory}, manifest {manifest}")


def _check(directory: Path, parts: list[tuple[str, int, str]], upto: int) -> None:
    for i, (name, size, digest) in enumerate(parts[:upto], 1):
        path = directory / name
        if not path.is_file():
            fail(f"part {i} ({path}) is not here: the machine went cold since the command that carried it. "
                 f"Start again from command 1.", COLD)
        if path.stat().st_size != size or sha256(path) != digest:
            fail(f"part {i} ({path}) does not match its sha256 in the manifest: carry it again "
                 f"(prepare.sh writes the parts and the manifest together).", COLD)
    print(f"weights: parts 1..{upto} of {len(parts)} present and checked")


@app.command()
def check(directory: Path, manifest: Path = typer.Option(..., "--manifest"),
          parts: int = typer.Option(..., "--parts", help="How many parts must be here by now")) -> None:
    """Exit 3, saying why, unless parts 1..--parts are in DIR with their manifest's sha256 (a manifest of
    fewer parts: all of them)."""
    listed, _ = read_manifest(manifest)
    _check(directory, listed, min(parts, len(listed)))


@app.command()
def join(directory: Path, dest: Path, manifest: Path = typer.Option(..., "--manifest")) -> None:
    """Check every part, join them into DEST (written beside it, then renamed) and check the whole."""
    listed, (name, size, digest) = read_manifest(manifest)
    _check(directory, listed, len(listed))
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".joining")
    with open(tmp, "wb") as out:
        for part, _, _ in listed:
            out.write((directory / part).read_bytes())
    if tmp.stat().st_size != size or sha256(tmp) != digest:
        tmp.unlink()
        fail(f"the joined {name} does not match its sha256 in the manifest")
    tmp.replace(dest)
    print(f"weights: {dest} joined from {len(listed)} parts, sha256 {digest[:16]}… checked")


if __name__ == "__main__":
    app()
