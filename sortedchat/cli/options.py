"""Options shared by the commands that load a model or generate, and the helpers that apply them."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from sortedchat import SortedChatError

ModelOpt = Annotated[
    Optional[str],
    typer.Option("--model", "-m", help="Hub id, HF directory, .gguf file, sortedchat checkpoint or PEFT adapter "
                 "[default: the built-in SmolLM2-135M-Instruct]"),
]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or mps")]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="auto, float32, bfloat16 or float16")]
Load4Opt = Annotated[bool, typer.Option("--load-in-4bit", help="Quantize the weights to 4 bits (bitsandbytes)")]
Load8Opt = Annotated[bool, typer.Option("--load-in-8bit", help="Quantize the weights to 8 bits (bitsandbytes)")]
TrustOpt = Annotated[bool, typer.Option("--trust-remote-code", help="Allow a hub model's own Python code to run")]
PickleOpt = Annotated[bool, typer.Option("--allow-pickle", help="Allow .bin pickle weights (can run code)")]
ExitsOpt = Annotated[Optional[str], typer.Option("--exits", help="Override the exits, e.g. 9,12,15,30")]

DepthOpt = Annotated[Optional[int], typer.Option("--depth", "-d", help="Run every token through the first K layers")]
AutoOpt = Annotated[bool, typer.Option("--auto", help="Per token, exit at the first confident exit")]
ThresholdOpt = Annotated[Optional[float], typer.Option("--threshold", help="Auto mode: one threshold for all exits")]
SpecOpt = Annotated[Optional[int], typer.Option("--speculative", help="Draft with the first K layers, verify with the rest")]
DraftLenOpt = Annotated[int, typer.Option("--draft-len", help="Speculative: initial tokens per draft")]
DraftStopOpt = Annotated[float, typer.Option("--draft-stop", help="Speculative: end a draft early when the drafted "
                                             "token's probability falls below this (0 = never)")]
AlwaysDraftOpt = Annotated[bool, typer.Option("--always-draft", help="Speculative: draft even where drafting is "
                                              "measured slower than full depth (by default it pauses there)")]
KvOpt = Annotated[str, typer.Option("--kv", help="How the layers a token skips get its K/V: exact (computed when a "
                                     "deeper token needs them) or propagate (at once, from the exit's hidden state: "
                                     "approximate, nothing waits; not with --speculative)")]

TemperatureOpt = Annotated[float, typer.Option("--temperature", "-t", help="0 = greedy")]
TopPOpt = Annotated[float, typer.Option("--top-p")]
TopKOpt = Annotated[int, typer.Option("--top-k", help="0 = off")]
SeedOpt = Annotated[Optional[int], typer.Option("--seed")]
MaxTokensOpt = Annotated[int, typer.Option("--max-new-tokens", "-n")]


def load_options(device="auto", dtype="auto", load_in_4bit=False, load_in_8bit=False, trust_remote_code=False,
                 allow_pickle=False, exits=None):
    from sortedchat.loading import LoadOptions

    return LoadOptions(device=device, dtype=dtype, load_in_4bit=load_in_4bit, load_in_8bit=load_in_8bit,
                       trust_remote_code=trust_remote_code, allow_pickle=allow_pickle, exits=exit_list(exits))


def exit_list(exits: str | None) -> list[int] | None:
    """`--exits 9,12,30` as numbers (checked against the model's layers once they are known)."""
    if not exits:
        return None
    try:
        return [int(x) for x in exits.split(",") if x.strip()]
    except ValueError:
        raise SortedChatError(f"--exits: expected comma-separated layer numbers, got {exits!r}") from None


def load_model(spec, opts, console=None):
    """Load with a rich status line (the first run of the default model converts it, ~15 s)."""
    from rich.console import Console

    from sortedchat.loading import load_sorted_model

    console = console or Console(stderr=True)
    with console.status("loading model", spinner="dots") as status:
        return load_sorted_model(spec, opts, progress=lambda stage, frac=None: status.update(stage))


def unicode_text(text: str, where: str) -> str:
    """`text` unchanged if it is valid Unicode, else an error naming the first bad byte.

    Python keeps bytes that are not UTF-8 (in argv, or on stdin read with `surrogateescape`) as lone
    surrogates, which no tokenizer accepts: refusing with the byte's position beats guessing a meaning.
    """
    for i, ch in enumerate(text, 1):
        if "\ud800" <= ch <= "\udfff":
            code = ord(ch)
            what = f"byte 0x{code - 0xDC00:02x}" if code >= 0xDC80 else f"lone surrogate U+{code:04X}"
            raise SortedChatError(f"{where}: not valid UTF-8 ({what} at character {i})")
    return text


def known_layers(spec: str | None) -> int | None:
    """The model's layer count, read from small files without loading it (a local directory's config.json,
    an adapter's base, a GGUF header, the shipped default's sortedchat.json); None where only loading would tell."""
    import json
    from pathlib import Path

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


def check_mode(num_layers: int | None, depth=None, auto=False, threshold=None, speculative=None, draft_stop=0.0,
               always_draft=False, kv="exact") -> None:
    """The mode options' rules; with `num_layers` also their range. Runs before loading too (with the count
    from `known_layers`), so a mistyped option never waits for the model."""
    chosen = sum(x is not None and x is not False for x in (depth, speculative)) + bool(auto)
    if chosen > 1:
        raise SortedChatError("--depth, --auto and --speculative exclude each other")
    if threshold is not None and not auto:
        raise SortedChatError("--threshold needs --auto")
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        raise SortedChatError(f"--threshold {threshold}: must be in 0..1")
    if not 0.0 <= draft_stop <= 1.0:
        raise SortedChatError(f"--draft-stop {draft_stop}: must be a probability in 0..1")
    if always_draft and speculative is None:
        raise SortedChatError("--always-draft needs --speculative")
    if kv not in ("exact", "propagate"):
        raise SortedChatError(f"--kv {kv}: choose exact or propagate")
    if kv != "exact" and speculative is not None:
        raise SortedChatError(f"--kv {kv}: speculative decoding needs exact K/V (its output is the full model's)")
    if num_layers is None:
        return
    if speculative is not None and not 1 <= speculative < num_layers:
        raise SortedChatError(f"--speculative {speculative}: draft depth must be in 1..{num_layers - 1}")
    if depth is not None and not 1 <= depth <= num_layers:
        raise SortedChatError(f"--depth {depth}: the model has {num_layers} layers")


def check_before_loading(spec: str | None, exits: str | None, **mode) -> None:
    """Everything about the model options that the layer count decides, before the model loads."""
    from sortedchat.config import validate_exits

    layers = known_layers(spec)
    parsed = exit_list(exits)
    if layers is not None and parsed is not None:
        validate_exits(parsed, layers, "--exits")
    check_mode(layers, **mode)


def make_mode(sm, depth=None, auto=False, threshold=None, speculative=None, draft_len=4, draft_stop=0.0,
              always_draft=False, kv="exact"):
    from sortedchat.engine import Mode

    check_mode(sm.num_layers, depth, auto, threshold, speculative, draft_stop, always_draft, kv)
    if auto:
        mode = Mode.auto(threshold, kv=kv)
    elif speculative is not None:
        mode = Mode.speculative(speculative, draft_len=draft_len, draft_stop=draft_stop, pace=not always_draft)
    else:
        mode = Mode.fixed(depth, kv=kv)
    return mode.validate(sm.num_layers)


def make_sampling(temperature=0.0, top_p=1.0, top_k=0, seed=None, max_new_tokens=256):
    from sortedchat.engine import SamplingConfig

    return SamplingConfig(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                          max_new_tokens=max_new_tokens).validate()
