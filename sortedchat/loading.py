"""Turn whatever the user passed as `--model` into a `SortedModel`.

Accepted: nothing (the default model), a `.gguf` file, a local HF directory, a sortedchat checkpoint
(HF directory + `sortedchat.json`), a PEFT adapter directory (base from its config), or a hub id.
Safe by default: safetensors only unless `--allow-pickle`, no remote code unless `--trust-remote-code`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

# default_model's functions are called through the module: tests replace them
from sortedchat import SortedChatError, default_model, first_line
from sortedchat.config import CONFIG_NAME, SortedConfig, default_exits, validate_exits
from sortedchat.convert import convert_gguf, incomplete
from sortedchat.paths import cache_dir
from sortedchat.progress import Progress, quiet
from sortedchat.quantize import check_request, quantize_model
from sortedchat.sorted_model import ExitHeads, ExitLenses, SortedModel

DEFAULT_BASE = "default"  # the value of `base_model` that names the built-in SmolLM2 base
DEFAULT_LABEL = "SmolLM2-135M-Instruct (default)"  # the source a user sees when no --model was given

# bitsandbytes (imported by peft, which applies the default's adapter) warns on the terminal at import about an
# optional CPU kernel package we do not use.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


@dataclass
class LoadOptions:
    device: str = "auto"
    dtype: str = "auto"
    load_in_4bit: bool = False
    load_in_8bit: bool = False
    trust_remote_code: bool = False
    allow_pickle: bool = False
    exits: list[int] | None = None
    quantize: str | None = None  # "int8"/"int4": the products quantized on a CPU, after loading (`sortedchat.quantize`)
    compile: bool = False  # the front end compiles the decoding step after loading (`engine/compiled.py`)
    unmerged: bool = False  # keep a PEFT adapter beside its base (as `--quantize int4` does), not merged into it


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name not in ("cpu", "cuda", "mps") and not name.startswith("cuda:"):
        raise SortedChatError(f"--device: unknown device {name!r} (choose auto, cpu, cuda, mps)")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SortedChatError("--device cuda: no CUDA device is available on this machine")
    if name == "mps" and not torch.backends.mps.is_available():
        raise SortedChatError("--device mps: MPS is not available on this machine")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if device.type == "mps":
            return torch.float16
        return torch.float32
    if name not in table:
        raise SortedChatError(f"--dtype: unknown dtype {name!r} (choose auto, float32, bfloat16, float16)")
    return table[name]


def _check_weights(directory: Path, allow_pickle: bool) -> None:
    has_safe = any(directory.glob("*.safetensors"))
    has_pickle = any(directory.glob("*.bin")) or any(directory.glob("*.pt"))
    if not has_safe and has_pickle and not allow_pickle:
        raise SortedChatError(
            f"{directory}: only pickle weights (.bin) found; they can run code when loaded. "
            "Convert them to safetensors, or pass --allow-pickle if you trust the source"
        )
    if not has_safe and not has_pickle:
        raise SortedChatError(f"{directory}: no weights found (expected *.safetensors)")


def _quantization(opts: LoadOptions, dtype: torch.dtype):
    if not (opts.load_in_4bit or opts.load_in_8bit):
        return None
    if opts.load_in_4bit and opts.load_in_8bit:
        raise SortedChatError("--load-in-4bit and --load-in-8bit exclude each other")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise SortedChatError("--load-in-4bit/--load-in-8bit need bitsandbytes: pip install bitsandbytes") from None
    from transformers import BitsAndBytesConfig

    if opts.load_in_4bit:
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
    return BitsAndBytesConfig(load_in_8bit=True)


def _from_pretrained(source: str, opts: LoadOptions, device: torch.device, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    quant = _quantization(opts, dtype)
    # local_files_only: only `sortedchat pull` reaches the network (a hub id not cached is refused before this)
    kwargs = dict(dtype=dtype, trust_remote_code=opts.trust_remote_code, use_safetensors=not opts.allow_pickle or None,
                  local_files_only=True)
    if quant is not None:
        kwargs.update(quantization_config=quant, device_map={"": str(device)})
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except SortedChatError:
        raise
    except Exception as exc:
        raise SortedChatError(f"{source}: cannot load model weights ({first_line(exc)})") from None
    if quant is None:
        model.to(device)
    return model.eval()


def _tokenizer(source: str | Path, opts: LoadOptions):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(source), trust_remote_code=opts.trust_remote_code,
                                             local_files_only=True)
    except Exception as exc:
        raise SortedChatError(f"{source}: cannot load tokenizer ({first_line(exc)})") from None


HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.model", "*.txt", "*.tiktoken"]


def pull_hub_model(repo_id: str) -> str:
    """Download a hub model's safetensors, config and tokenizer into the HF cache (explicit network use)."""
    from huggingface_hub import constants, snapshot_download

    constants.HF_HUB_OFFLINE = False
    try:
        return snapshot_download(repo_id, allow_patterns=HUB_PATTERNS)
    except Exception as exc:
        raise SortedChatError(f"{repo_id}: download failed ({first_line(exc)})") from None


def _check_hub_cache(repo_id: str) -> None:
    """A hub id must be in the local hub cache, whatever HF_HUB_OFFLINE says: only `pull` downloads."""
    from huggingface_hub import try_to_load_from_cache

    if not isinstance(try_to_load_from_cache(repo_id, "config.json"), str):
        raise SortedChatError(f"--model {repo_id}: not a local path, and not in the local hub cache "
                              f"(run `sortedchat pull {repo_id}` to download it)")


def gguf_cache_dir(gguf: Path) -> Path:
    """A GGUF converts once; the cache key follows the file's path, size and modification time."""
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_dir() / "models" / f"{gguf.stem}-{key}"


def _load_exit_parts(directory: Path, name: str | None, what: str, build, device, dtype):
    """Per-exit weights stored beside `sortedchat.json` (ICT heads, lenses), built for the exits their
    keys name (`heads.21.weight`, `lenses.21.bias`, ...); None when the checkpoint has none."""
    if not name:
        return None

    path = directory / name
    try:
        state = load_file(str(path))
    except Exception as exc:
        raise SortedChatError(f"{path}: cannot load {what} ({first_line(exc)})") from None
    module = build(sorted({int(k.split(".")[1]) for k in state}))
    try:
        module.load_state_dict(state)
    except RuntimeError as exc:
        raise SortedChatError(f"{path}: {what} do not fit this model ({first_line(exc)})") from None
    return module.to(device=device, dtype=dtype).eval()


def load_exit_lenses(source: str, hidden_size: int) -> ExitLenses:
    """The lenses a trained model stores, to start new ones from (`sortedchat train --init-lenses`): a model
    directory whose `sortedchat.json` names them, or "default" for the shipped default's."""
    if source == "default":
        from sortedchat.default_model import SHIPPED_ADAPTER as directory
    else:
        directory = Path(source).expanduser()
    if not (directory / CONFIG_NAME).is_file():
        raise SortedChatError(f"--init-lenses {source}: no {CONFIG_NAME} there (a model directory with lenses)")
    name = SortedConfig.read(directory).exit_lenses
    if not name:
        raise SortedChatError(f"--init-lenses {source}: its {CONFIG_NAME} names no exit lenses")
    return _load_exit_parts(directory, name, "exit lenses", lambda exits: ExitLenses(exits, hidden_size), "cpu",
                            torch.float32)


def _load_checked(source: str, opts: LoadOptions, device, dtype):
    """A local directory's weights are checked (safetensors unless --allow-pickle) before they load."""
    if Path(source).is_dir():
        _check_weights(Path(source), opts.allow_pickle)
    return _from_pretrained(source, opts, device, dtype)


def _load_base(base: str, opts: LoadOptions, device, dtype, progress: Progress):
    """The base model a checkpoint names (`default`: the built-in one), and where it was loaded from."""
    base_dir = _resolve_base(base, progress)
    return _load_checked(base_dir, opts, device, dtype), base_dir


def _resolve_base(base: str, progress: Progress) -> str:
    if base == DEFAULT_BASE:
        return str(default_model.base_model_dir(progress))
    if not Path(base).expanduser().exists():
        _check_hub_cache(base)
    return base


def load_sorted_model(spec: str | None = None, opts: LoadOptions | None = None,
                      progress: Progress = quiet) -> SortedModel:
    """Load `spec` (see module doc) as a `SortedModel` on the requested device and dtype."""
    opts = opts or LoadOptions()
    device, dtype = resolved(opts)
    directory = _locate(spec, progress)
    progress("loading weights", None)
    if directory is None:
        model, tokenizer, cfg = _load_hub_model(spec, opts, device, dtype)
    else:
        model, tokenizer, cfg = _load_directory(directory, opts, device, dtype, progress)
    if opts.exits is not None:
        cfg.exits = validate_exits(opts.exits, model.config.num_hidden_layers, "--exits")
    heads, lenses = (None, None) if directory is None else _load_exit_modules(directory, cfg, model, device, dtype)
    sm = SortedModel(model=model, tokenizer=tokenizer, config=cfg, source=DEFAULT_LABEL if spec is None else spec,
                     weights_path=spec if directory is None else str(directory), exit_heads=heads, exit_lenses=lenses)
    if opts.quantize:
        progress(f"quantizing to {opts.quantize}", None)
        quantize_model(sm, opts.quantize, grouped=opts.compile)  # the compiled graph's weights, only for it
    progress("model ready", 1.0)
    return sm


def resolved(opts: LoadOptions) -> tuple[torch.device, torch.dtype]:
    """The device and dtype `opts` load on, checked against `--quantize` before any weight loads."""
    device = resolve_device(opts.device)
    dtype = resolve_dtype(opts.dtype, device)
    if opts.quantize:
        check_request(opts.quantize, device, dtype, opts.load_in_4bit or opts.load_in_8bit)
    return device, dtype


def _locate(spec: str | None, progress: Progress) -> Path | None:
    """The directory `spec` names (a GGUF converts into the cache here, once); None for a hub id."""
    if spec is None:
        return default_model.default_model_dir(progress)
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        return _converted_gguf(spec, path, progress)
    if path.exists():
        if not path.is_dir():
            raise SortedChatError(f"--model {spec}: not a model directory or .gguf file")
        return path
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1 or "\\" in spec:
        raise SortedChatError(f"--model {spec}: no such file or directory")
    return None


def _converted_gguf(spec: str, path: Path, progress: Progress) -> Path:
    if not path.is_file():
        raise SortedChatError(f"--model {spec}: no such file")

    directory = gguf_cache_dir(path)
    if incomplete(directory) is not None:
        convert_gguf(path, directory, progress)
    return directory


def _load_hub_model(repo_id: str, opts: LoadOptions, device, dtype):
    """A hub id loads from the local hub cache only (`sortedchat pull` downloads); it has no sortedchat.json."""
    _check_hub_cache(repo_id)
    model = _from_pretrained(repo_id, opts, device, dtype)
    return model, _tokenizer(repo_id, opts), SortedConfig()


def _load_directory(directory: Path, opts: LoadOptions, device, dtype, progress: Progress):
    """A model directory, a checkpoint (`sortedchat.json` beside it), an adapter, or lenses alone on a base."""
    cfg = SortedConfig.read(directory) if (directory / CONFIG_NAME).is_file() else SortedConfig()
    if (directory / "adapter_config.json").is_file():
        model, tokenizer = _load_adapter(directory, cfg, opts, device, dtype, progress)
    elif (directory / "config.json").is_file():
        model, tokenizer = _load_checked(str(directory), opts, device, dtype), _tokenizer(directory, opts)
    elif cfg.base_model and cfg.exit_lenses:
        # only per-exit parts (lenses) were trained on a frozen model: its base, as it is
        model, base_dir = _load_base(cfg.base_model, opts, device, dtype, progress)
        tokenizer = _tokenizer(base_dir, opts)
    else:
        raise SortedChatError(f"{directory}: not a model directory (no config.json or adapter_config.json)")
    return model, tokenizer, cfg


def _load_exit_modules(directory: Path, cfg: SortedConfig, model, device, dtype):
    """The checkpoint's ICT exit heads and exit lenses (each None when it has none)."""
    hidden = model.config.hidden_size
    heads = _load_exit_parts(directory, cfg.exit_heads, "exit heads", lambda exits: ExitHeads(
        exits, hidden, model.config.vocab_size, model.model.norm), device, dtype)
    lenses = _load_exit_parts(directory, cfg.exit_lenses, "exit lenses",
                              lambda exits: ExitLenses(exits, hidden), device, dtype)
    return heads, lenses


def _load_adapter(directory: Path, cfg: SortedConfig, opts: LoadOptions, device, dtype, progress: Progress):
    """Base model (from `sortedchat.json` or the adapter's own config) + PEFT adapter."""
    from peft import PeftModel

    try:
        adapter_cfg = json.loads((directory / "adapter_config.json").read_text())
    except json.JSONDecodeError as exc:
        raise SortedChatError(f"{directory / 'adapter_config.json'}: line {exc.lineno}: invalid JSON") from None
    base = cfg.base_model or adapter_cfg.get("base_model_name_or_path")
    if not base:
        raise SortedChatError(f"{directory}: adapter names no base model (set base_model in {CONFIG_NAME})")
    model, base_dir = _load_base(base, opts, device, dtype, progress)
    progress(f"applying the adapter in {directory.name}", None)
    try:
        peft_model = PeftModel.from_pretrained(model, str(directory), local_files_only=True)
    except Exception as exc:
        raise SortedChatError(f"{directory}: cannot apply adapter ({first_line(exc)})") from None
    # A quantized base cannot absorb the adapter; keep LoRA layers injected and drive the inner model. So does a
    # base that `--quantize int4` will run in its 4-bit blocks: merging would move its weights off them.
    unmerged = opts.unmerged or opts.load_in_4bit or opts.load_in_8bit or opts.quantize == "int4"
    model = peft_model.base_model.model if unmerged else peft_model.merge_and_unload()
    tok_source = directory if (directory / "tokenizer_config.json").is_file() else base_dir
    return model.eval(), _tokenizer(tok_source, opts)


@dataclass
class ModelFacts:
    """What `sortedchat info` shows about a model, as loading it would give it, read from its small files."""

    source: str
    class_name: str
    num_layers: int
    exits: list[int]
    config: SortedConfig
    exit_heads: bool
    lens_exits: list[int] | None
    parameters: int
    dtype: torch.dtype
    device: torch.device
    weights_path: str

    thresholds = SortedModel.thresholds  # the loaded model's rule, over the same fields


def read_model_facts(spec: str | None, opts: LoadOptions) -> ModelFacts | None:
    """`spec`'s facts from config.json, sortedchat.json and the safetensors headers, without loading a weight;
    None where only loading would tell (a hub id, a model still to be converted, quantized or pickled weights)."""
    if opts.load_in_4bit or opts.load_in_8bit or opts.quantize:
        return None
    directory = _prepared_directory(spec)
    if directory is None:
        return None
    cfg = SortedConfig.read(directory) if (directory / CONFIG_NAME).is_file() else SortedConfig()

    try:
        weights = _weights_directory(directory, cfg)
        if weights is None or not (weights / "config.json").is_file():
            return None
        hf = json.loads((weights / "config.json").read_text(encoding="utf-8"))
        layers = hf.get("num_hidden_layers") or (hf.get("text_config") or {}).get("num_hidden_layers")
        parameters, lens_exits = _stored_parameters(weights), _lens_exits(directory, cfg)
    except Exception:  # a damaged file (bad JSON, a safetensors header that is not one): loading names it
        return None
    if not layers or not hf.get("architectures") or parameters is None:
        return None
    exits = validate_exits(list(opts.exits or cfg.exits or default_exits(layers)), layers,
                           "--exits" if opts.exits else f"exits of {spec or DEFAULT_LABEL}")
    cfg.exits = exits
    device = resolve_device(opts.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return ModelFacts(DEFAULT_LABEL if spec is None else spec, hf["architectures"][0], layers, exits, cfg,
                      bool(cfg.exit_heads), lens_exits, parameters,
                      resolve_dtype(opts.dtype, device), device, str(directory))


def _prepared_directory(spec: str | None) -> Path | None:
    """The directory `_locate` would give, when it needs no conversion first."""
    if spec is None:
        return default_model.prepared_default_dir()
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        return gguf_cache_dir(path) if path.is_file() and incomplete(gguf_cache_dir(path)) is None else None
    return path if path.is_dir() else None


def _weights_directory(directory: Path, cfg: SortedConfig) -> Path | None:
    """Where the model's own weights and config.json are: the directory, or the local base it names."""
    if (directory / "config.json").is_file():
        return directory
    base = cfg.base_model
    if (directory / "adapter_config.json").is_file():
        base = base or json.loads((directory / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if base == DEFAULT_BASE:
        base_dir = cache_dir() / "models" / default_model.BASE_DIRNAME
        return base_dir if incomplete(base_dir) is None else None
    return Path(base) if base and Path(base).is_dir() else None


def _stored_parameters(weights: Path) -> int | None:
    """The number of weights the safetensors files hold, from their headers (tied weights are stored once, as
    the loaded model counts them)."""
    index = weights / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() \
        else ["model.safetensors"] if (weights / "model.safetensors").is_file() else []
    if not files:
        return None
    total = 0
    for name in files:
        with safe_open(str(weights / name), framework="pt") as f:
            for key in f.keys():
                total += math.prod(f.get_slice(key).get_shape())
    return total


def _lens_exits(directory: Path, cfg: SortedConfig) -> list[int] | None:
    """The exits the checkpoint's lenses are for, from their file's keys (`lenses.21.weight`)."""
    if not cfg.exit_lenses:
        return None

    with safe_open(str(directory / cfg.exit_lenses), framework="pt") as f:
        return sorted({int(k.split(".")[1]) for k in f.keys()})
