"""What can be checked before a model loads: its layer count, read from small files, and the options against it."""

from __future__ import annotations

import json
from pathlib import Path

from sortedchat.cli.options import ModeFlags, PreciseLoadFlags, warn_of_threads
from sortedchat.engine.modes import Mode


def check_before_loading(spec: str | None, load: PreciseLoadFlags, mode: ModeFlags | None = None) -> Mode:
    """Everything about the model options that the layer count decides, before the model loads; the mode the flags
    ask for (checked against the layer count where it is known without loading)."""
    from sortedchat.config import validate_exits

    warn_of_threads(load.threads)
    layers = known_layers(spec)
    parsed = load.exit_list()
    if layers is not None and parsed is not None:
        validate_exits(parsed, layers, "--exits")
    return (mode or ModeFlags()).check(layers)


def known_layers(spec: str | None) -> int | None:
    """The model's layer count, read from small files without loading it (a local directory's config.json,
    an adapter's base, a GGUF header, the shipped default's sortedchat.json); None where only loading would tell."""
    from sortedchat.config import CONFIG_NAME

    def shipped_default() -> int | None:
        from sortedchat.default_model import SHIPPED_ADAPTER

        exits = json.loads((SHIPPED_ADAPTER / CONFIG_NAME).read_text(encoding="utf-8")).get("exits")
        return exits[-1] if exits else None

    def in_directory(directory: Path) -> int | None:
        if (directory / "config.json").is_file():
            cfg = json.loads((directory / "config.json").read_text(encoding="utf-8"))
            return cfg.get("num_hidden_layers") or (cfg.get("text_config") or {}).get("num_hidden_layers")
        if (directory / "adapter_config.json").is_file():
            base = json.loads((directory / "adapter_config.json").read_text(encoding="utf-8"))
            ours = directory / CONFIG_NAME
            base = (json.loads(ours.read_text(encoding="utf-8")) if ours.is_file() else {}).get("base_model") \
                or base.get("base_model_name_or_path")
            if base == "default":
                return shipped_default()
            return in_directory(Path(base)) if base and Path(base).is_dir() else None
        return None

    try:
        if spec is None:
            return shipped_default()
        path = Path(spec).expanduser()
        if path.suffix == ".gguf" and path.is_file():
            from sortedchat.gguf_meta import gguf_block_count

            return gguf_block_count(path)
        return in_directory(path)
    except (OSError, ValueError, AttributeError, TypeError, IndexError):
        return None  # a damaged file: loading names the problem
