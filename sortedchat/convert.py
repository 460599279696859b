"""One-time conversions into the cache: GGUF -> safetensors, and base + adapter -> merged weights.

Both write into a temporary directory beside the target and rename it into place, so an interrupted
conversion never leaves a half-written model that a later run would load.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from sortedchat import SortedChatError
from sortedchat.progress import Progress


def publish_dir(tmp: Path, target: Path) -> Path:
    """Move a finished temporary directory into place, replacing an older one."""
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)
    return target


def convert_gguf(gguf: Path, target: Path, progress: Progress) -> Path:
    """Dequantize a GGUF with transformers and save it as a plain HF safetensors directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        progress(f"reading {gguf.name} (one-time conversion)", 0.1)
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(
                str(gguf.parent), gguf_file=gguf.name, quantization_config=GgufConfig(dequantize=True)
            )
        except Exception as exc:  # transformers raises many kinds for a bad GGUF
            raise SortedChatError(f"{gguf}: cannot read GGUF ({str(exc).splitlines()[0]})") from None
        progress("writing safetensors into the cache", 0.7)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        progress("conversion done", 1.0)
        return publish_dir(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def merge_adapter(base: Path, adapter: Path, target: Path, progress: Progress) -> Path:
    """Merge a PEFT adapter (plus its `sortedchat.json` and exit heads) into a standalone checkpoint."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sortedchat.config import CLASSIFIER_NAME, CONFIG_NAME, EXIT_HEADS_NAME, EXIT_LENSES_NAME

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        progress(f"applying adapter {adapter.name}", 0.3)
        model = AutoModelForCausalLM.from_pretrained(base, use_safetensors=True)
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
        progress("writing merged weights into the cache", 0.7)
        model.save_pretrained(tmp, safe_serialization=True)
        AutoTokenizer.from_pretrained(base).save_pretrained(tmp)
        for name in (CONFIG_NAME, EXIT_HEADS_NAME, EXIT_LENSES_NAME, CLASSIFIER_NAME):
            if (adapter / name).is_file():
                shutil.copy2(adapter / name, tmp / name)
        progress("adapter merged", 1.0)
        return publish_dir(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
