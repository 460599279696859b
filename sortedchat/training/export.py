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
    from safetensors.torch import save_file
    from transformers.utils import logging as hf_logging

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out, prefix=".export-"))
    try:
        state = _strip(full_state, "model.")
        is_adapter = hasattr(model, "peft_config")
        if is_adapter and merge:  # single process or DDP: the adapter weights are all here
            model = model.merge_and_unload()
            state = None
            is_adapter = False
        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # our own status line is showing
        try:
            if weights:
                model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
        finally:
            if bars:
                hf_logging.enable_progress_bar()
        tokenizer.save_pretrained(tmp)
        if exit_heads is not None:
            heads_state = _strip(full_state, "exit_heads.") if full_state is not None else exit_heads.state_dict()
            save_file({k: v.detach().contiguous().cpu() for k, v in heads_state.items()}, str(tmp / EXIT_HEADS_NAME))
            config.exit_heads = EXIT_HEADS_NAME
        if exit_lenses is not None:
            lens_state = _strip(full_state, "exit_lenses.") if full_state is not None else exit_lenses.state_dict()
            save_file({k: v.detach().float().contiguous().cpu() for k, v in lens_state.items()},
                      str(tmp / EXIT_LENSES_NAME))
            config.exit_lenses = EXIT_LENSES_NAME
        if not is_adapter and weights:
            config.base_model = None
        # An earlier finished export in OUT may hold files this one does not write (adapter vs full).
        for stale in MODEL_FILES:
            if (out / stale).exists() and not (tmp / stale).exists():
                (out / stale).unlink()
        for item in sorted(tmp.iterdir()):
            os.replace(item, out / item.name)
        config.write(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def base_model_name(spec: str) -> str:
    """How `sortedchat.json` names the base of an adapter: "default", an absolute path or a hub id."""
    if spec == "default":
        return "default"
    path = Path(spec).expanduser()
    return str(path.resolve()) if path.exists() else spec
