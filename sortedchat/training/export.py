"""The finished model directory: HF weights or a PEFT adapter, tokenizer, exit heads or lenses, `sortedchat.json`.

Files are written into a hidden directory inside OUT and then moved into place one by one, with
`sortedchat.json` last, so OUT only looks like a finished model once everything it names is there.
The result loads with `load_sorted_model(OUT)` (and so in `sortedchat chat`, `ask`, `eval`) as it is.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from sortedchat.config import EXIT_HEADS_NAME, EXIT_LENSES_NAME, SortedConfig

MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
               "adapter_config.json", "adapter_model.safetensors", EXIT_HEADS_NAME, EXIT_LENSES_NAME)


def _strip(state: dict | None, prefix: str) -> dict | None:
    if state is None:
        return None
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def export_model(out: Path, model, tokenizer, config: SortedConfig, full_state: dict | None = None,
                 exit_heads=None, merge: bool = False, exit_lenses=None, weights: bool = True) -> None:
    """Write the trained model into `out`. `full_state` is the wrapper's gathered state dict (FSDP/ZeRO-3).

    `weights=False` (lenses trained on a frozen model) writes no model weights: `sortedchat.json` names the
    base, and the directory holds only what was trained."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out, prefix=".export-"))
    try:
        state = _strip(full_state, "model.")
        is_adapter = hasattr(model, "peft_config")
        if is_adapter and merge:  # single process or DDP: the adapter weights are all here
            model, state, is_adapter = model.merge_and_unload(), None, False
        if weights:
            _save_weights(tmp, model, state)
        tokenizer.save_pretrained(tmp)
        if exit_heads is not None:
            _save_exit_part(tmp / EXIT_HEADS_NAME, exit_heads, full_state, "exit_heads.", to_float32=False)
            config.exit_heads = EXIT_HEADS_NAME
        if exit_lenses is not None:
            _save_exit_part(tmp / EXIT_LENSES_NAME, exit_lenses, full_state, "exit_lenses.", to_float32=True)
            config.exit_lenses = EXIT_LENSES_NAME
        if not is_adapter and weights:
            config.base_model = None
        _move_into_place(tmp, out, config)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _save_weights(tmp: Path, model, state: dict | None) -> None:
    """The model's (or adapter's) safetensors, without transformers' progress bar: our own status line shows."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def _save_exit_part(path: Path, module, full_state: dict | None, prefix: str, to_float32: bool) -> None:
    """Exit heads or lenses in their own file, from the gathered state when the run was sharded."""
    from safetensors.torch import save_file

    state = _strip(full_state, prefix) if full_state is not None else module.state_dict()
    save_file({k: (v.detach().float() if to_float32 else v.detach()).contiguous().cpu() for k, v in state.items()},
              str(path))


def _move_into_place(tmp: Path, out: Path, config: SortedConfig) -> None:
    """Files move into `out` one by one, `sortedchat.json` last (see the module doc)."""
    # An earlier finished export in OUT may hold files this one does not write (adapter vs full).
    for stale in MODEL_FILES:
        if (out / stale).exists() and not (tmp / stale).exists():
            (out / stale).unlink()
    for item in sorted(tmp.iterdir()):
        os.replace(item, out / item.name)
    config.write(out)


def base_model_name(spec: str) -> str:
    """How `sortedchat.json` names the base of an adapter: "default", an absolute path or a hub id."""
    if spec == "default":
        return "default"
    path = Path(spec).expanduser()
    return str(path.resolve()) if path.exists() else spec
