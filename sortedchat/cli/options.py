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

TemperatureOpt = Annotated[float, typer.Option("--temperature", "-t", help="0 = greedy")]
TopPOpt = Annotated[float, typer.Option("--top-p")]
TopKOpt = Annotated[int, typer.Option("--top-k", help="0 = off")]
SeedOpt = Annotated[Optional[int], typer.Option("--seed")]
MaxTokensOpt = Annotated[int, typer.Option("--max-new-tokens", "-n")]


def load_options(device="auto", dtype="auto", load_in_4bit=False, load_in_8bit=False, trust_remote_code=False,
                 allow_pickle=False, exits=None):
    from sortedchat.loading import LoadOptions

    parsed = None
    if exits:
        try:
            parsed = [int(x) for x in exits.split(",") if x.strip()]
        except ValueError:
            raise SortedChatError(f"--exits: expected comma-separated layer numbers, got {exits!r}") from None
    return LoadOptions(device=device, dtype=dtype, load_in_4bit=load_in_4bit, load_in_8bit=load_in_8bit,
                       trust_remote_code=trust_remote_code, allow_pickle=allow_pickle, exits=parsed)


def load_model(spec, opts, console=None):
    """Load with a rich status line (the first run of the default model converts it, ~15 s)."""
    from rich.console import Console

    from sortedchat.loading import load_sorted_model

    console = console or Console(stderr=True)
    with console.status("loading model", spinner="dots") as status:
        return load_sorted_model(spec, opts, progress=lambda stage, frac=None: status.update(stage))


def make_mode(sm, depth=None, auto=False, threshold=None, speculative=None, draft_len=4, draft_stop=0.0,
              always_draft=False):
    from sortedchat.engine import Mode

    chosen = sum(x is not None and x is not False for x in (depth, speculative)) + bool(auto)
    if chosen > 1:
        raise SortedChatError("--depth, --auto and --speculative exclude each other")
    if threshold is not None and not auto:
        raise SortedChatError("--threshold needs --auto")
    if not 0.0 <= draft_stop <= 1.0:
        raise SortedChatError(f"--draft-stop {draft_stop}: must be a probability in 0..1")
    if always_draft and speculative is None:
        raise SortedChatError("--always-draft needs --speculative")
    if auto:
        mode = Mode.auto(threshold)
    elif speculative is not None:
        if not 1 <= speculative < sm.num_layers:
            raise SortedChatError(f"--speculative {speculative}: draft depth must be in 1..{sm.num_layers - 1}")
        mode = Mode.speculative(speculative, draft_len=draft_len, draft_stop=draft_stop, pace=not always_draft)
    else:
        if depth is not None and not 1 <= depth <= sm.num_layers:
            raise SortedChatError(f"--depth {depth}: the model has {sm.num_layers} layers")
        mode = Mode.fixed(depth)
    return mode.validate(sm.num_layers)


def make_sampling(temperature=0.0, top_p=1.0, top_k=0, seed=None, max_new_tokens=256):
    from sortedchat.engine import SamplingConfig

    return SamplingConfig(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                          max_new_tokens=max_new_tokens).validate()
