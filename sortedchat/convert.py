"""One-time conversions into the cache: GGUF -> safetensors, and the shipped default's small files.

Both write into a temporary directory beside the target and rename it into place, with a manifest of every
file and its size (`MANIFEST`), so an interrupted conversion never leaves a half-written model that a later
run would load, and a cached model that lost a file since (deleted by hand, a cleaner) is found and built
again rather than failing to load. A full disk ends the conversion with one line, and the temporary
directory goes with it.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from sortedchat import SortedChatError, first_line
from sortedchat.config import CLASSIFIER_NAME, CONFIG_NAME
from sortedchat.outputs import write_error
from sortedchat.progress import Progress

MANIFEST = ".complete"  # {"files": {name: size}} of a published directory
RECALIBRATED = (CONFIG_NAME, CLASSIFIER_NAME)  # `sortedchat calibrate` rewrites these in place: sizes not kept


def incomplete(target: Path) -> str | None:
    """Why the cached directory `target` cannot be used as it is (None: it is complete)."""
    try:
        files = json.loads((target / MANIFEST).read_text(encoding="utf-8"))["files"]
    except FileNotFoundError:
        return "not built" if not target.exists() else f"{target} has no {MANIFEST} (built by an older version)"
    except (OSError, ValueError, KeyError, TypeError):
        return f"{target / MANIFEST} is unreadable"
    for name, size in files.items():
        f = target / name
        if not f.is_file():
            return f"{f} is missing"
        if size is not None and f.stat().st_size != size:
            return f"{f} has {f.stat().st_size} bytes, not {size}"
    return None


def publish_dir(tmp: Path, target: Path) -> Path:
    """Record the finished temporary directory's files, then move it into place, replacing an older one."""
    files = {p.name: None if p.name in RECALIBRATED else p.stat().st_size
             for p in sorted(tmp.iterdir()) if p.is_file()}
    (tmp / MANIFEST).write_text(json.dumps({"files": files}, indent=1) + "\n", encoding="utf-8")
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)
    return target


def build_dir(target: Path, fill: Callable[[Path], object], needs: str = "") -> Path:
    """`fill(temporary directory)`, then publish it as `target`. A failed write (a full disk) removes the
    temporary directory and is one line saying where and, with `needs`, how much room it takes."""
    tmp = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
        fill(tmp)
        return publish_dir(tmp, target)
    except Exception as exc:
        reason = write_error(exc, target.parent)
        if reason is None:
            raise
        room = f"; it needs about {needs} there" if needs else ""
        raise SortedChatError(f"cannot write {target.name} into {target.parent} ({reason}){room}: free some space, "
                              "or set SORTEDCHAT_CACHE_DIR to a folder with room") from None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def _ticking(progress: Progress, stage: str, fraction: float, every: float = 1.0) -> Iterator[Callable[[], None]]:
    """Report `stage` with the seconds it has taken, every `every` seconds, until the block ends or the `stop` it
    gives is called: a long step that reports nothing itself (parsing a GGUF's header and vocabulary, three times
    over in transformers) still moves the display."""
    done = threading.Event()

    def tick() -> None:
        seconds = 0.0
        while not done.wait(every):
            seconds += every
            progress(f"{stage} ({seconds:.0f} s)", fraction)

    thread = threading.Thread(target=tick, name="sortedchat-progress", daemon=True)
    thread.start()
    try:
        yield done.set
    finally:
        done.set()
        thread.join()


@contextmanager
def _tensor_progress(progress: Progress, stage: str, start: float, end: float,
                     on_start: Callable[[], None] = lambda: None) -> Iterator[None]:
    """transformers dequantizes a GGUF's tensors one by one under a tqdm bar that would print over our own
    display: report each tensor through `progress` instead (`on_start` first)."""
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    def counted(items, **_):
        items = list(items)
        on_start()
        for i, item in enumerate(items, 1):
            yield item
            progress(f"{stage} {i}/{len(items)}", start + (end - start) * i / len(items))

    real = gguf_utils.tqdm
    gguf_utils.tqdm = counted
    try:
        yield
    finally:
        gguf_utils.tqdm = real


def convert_gguf(gguf: Path, target: Path, progress: Progress) -> Path:
    """Dequantize a GGUF with transformers and save it as a plain HF safetensors directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    progress(f"reading {gguf.name}", 0.02)
    try:
        with _ticking(progress, f"reading {gguf.name}", 0.05) as stop:
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            with _tensor_progress(progress, "dequantizing tensor", 0.1, 0.7, on_start=stop):
                model = AutoModelForCausalLM.from_pretrained(
                    str(gguf.parent), gguf_file=gguf.name, quantization_config=GgufConfig(dequantize=True)
                )
    except Exception as exc:  # transformers raises many kinds for a bad GGUF
        raise SortedChatError(f"{gguf}: cannot read GGUF ({first_line(exc)})") from None

    def save(tmp: Path) -> None:
        with _ticking(progress, "writing safetensors into the cache", 0.75):
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
        progress("conversion done", 1.0)

    return build_dir(target, save, needs=f"{model.num_parameters() * 4 / 1e6:.0f} MB")
