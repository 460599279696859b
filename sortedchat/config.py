"""`sortedchat.json`: what a checkpoint adds to a plain Hugging Face model directory.

The weights stay loadable by any transformers user; this small file records the exits, the auto-mode
thresholds, where the base model lives when the directory holds only a PEFT adapter, and how the model
was trained.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sortedchat import SortedChatError

CONFIG_NAME = "sortedchat.json"
EXIT_HEADS_NAME = "exit_heads.safetensors"
EXIT_LENSES_NAME = "exit_lenses.safetensors"  # per-exit affine lenses (`sortedchat train --method lens / --lenses`)
CLASSIFIER_NAME = "exit_classifier.safetensors"  # the `classifier` confidence measure's weights
FORMAT_VERSION = 1


def default_exits(num_layers: int, count: int = 8) -> list[int]:
    """`count` exits evenly spaced from 30% to 100% of the depth, like the paper's 12,16,...,40 of 40.

    For 30 layers this gives 9,12,...,30; for 40 layers 12,16,...,40.
    """
    first = max(1, round(0.3 * num_layers))
    if count <= 1 or first >= num_layers:
        return [num_layers]
    step = (num_layers - first) / (count - 1)
    exits = sorted({min(num_layers, max(1, round(first + i * step))) for i in range(count)})
    if exits[-1] != num_layers:
        exits.append(num_layers)
    return exits


def validate_exits(exits: list[int], num_layers: int, where: str) -> list[int]:
    """Sorted, unique exits within 1..num_layers; the last layer is always an exit."""
    if not exits:
        raise SortedChatError(f"{where}: the list of exits is empty")
    for e in exits:
        if not isinstance(e, int) or isinstance(e, bool) or e < 1 or e > num_layers:
            raise SortedChatError(f"{where}: exit {e!r} is outside 1..{num_layers} (the model has {num_layers} layers)")
    out = sorted(set(exits))
    if out[-1] != num_layers:
        out.append(num_layers)
    return out


@dataclass
class SortedConfig:
    """The contents of `sortedchat.json`."""

    exits: list[int] | None = None
    thresholds: dict[int, float] = field(default_factory=dict)
    confidence: str = "maxprob"
    base_model: str | None = None
    exit_heads: str | None = None
    exit_lenses: str | None = None
    training: dict = field(default_factory=dict)
    calibration: dict = field(default_factory=dict)
    format: int = FORMAT_VERSION

    @classmethod
    def read(cls, directory: str | os.PathLike) -> "SortedConfig":
        path = Path(directory) / CONFIG_NAME
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise SortedChatError(f"{path}: line {exc.lineno}: invalid JSON ({exc.msg})") from None
        except OSError as exc:
            raise SortedChatError(f"{path}: cannot read ({exc.strerror})") from None
        if not isinstance(raw, dict):
            raise SortedChatError(f"{path}: expected a JSON object")
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(raw) - known
        if unknown:
            raise SortedChatError(f"{path}: unknown field(s) {', '.join(sorted(unknown))}")
        try:
            thresholds = {int(k): float(v) for k, v in (raw.get("thresholds") or {}).items()}
        except (TypeError, ValueError):
            raise SortedChatError(f"{path}: 'thresholds' must map exit layers to numbers") from None
        for exit_layer, value in thresholds.items():  # as `--threshold` is checked: 1 means "never exit here"
            if not 0.0 <= value <= 1.0:
                raise SortedChatError(f"{path}: 'thresholds' {exit_layer}: {value} is outside 0..1")
        raw["thresholds"] = thresholds
        exits = raw.get("exits")
        if exits is not None and (not isinstance(exits, list) or not all(isinstance(e, int) for e in exits)):
            raise SortedChatError(f"{path}: 'exits' must be a list of layer numbers")
        _check_meaning(raw, path)
        return cls(**raw)

    def write(self, directory: str | os.PathLike) -> Path:
        """Write atomically: a crash leaves the previous file intact."""
        data = asdict(self)
        data["thresholds"] = {str(k): v for k, v in sorted(self.thresholds.items())}
        return atomic_write_text(Path(directory) / CONFIG_NAME, json.dumps(data, indent=2) + "\n")


def _check_meaning(raw: dict, path: Path) -> None:
    """What the fields say must make sense together: a format this version reads, exits to exit at, thresholds
    only for them. (Whether `confidence` names a measure is checked where the measures are known:
    `engine.confidence.check_configured`, when a session starts on the model.)"""
    version = raw.get("format", FORMAT_VERSION)
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= FORMAT_VERSION:
        raise SortedChatError(f"{path}: 'format' {version!r} is not one this sortedchat reads (1..{FORMAT_VERSION}; "
                              "a newer sortedchat may have written it)")
    exits = raw.get("exits")
    if exits is not None and not exits:
        raise SortedChatError(f"{path}: 'exits' is empty (list the exit layers, or leave the field out for the "
                              "default exits)")
    strays = sorted(set(raw["thresholds"]) - set(exits or raw["thresholds"]))
    if strays:
        raise SortedChatError(f"{path}: 'thresholds' {strays[0]}: layer {strays[0]} is not one of the exits "
                              f"{', '.join(map(str, exits))}")


def atomic_write_text(path: Path, text: str) -> Path:
    """Write `text` (UTF-8) atomically (`atomic_write`)."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write(path: Path, write: Callable[[Path], object]) -> Path:
    """`write(temporary path)` beside `path`, fsync, then rename over it: a crash leaves the previous file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
