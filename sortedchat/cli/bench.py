"""`sortedchat bench`: every decoding mode against transformers' generate, in one process."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from sortedchat import SortedChatError
from sortedchat.cli import options as o
from sortedchat.cli.option_groups import takes_groups
from sortedchat.cli.prechecks import check_before_loading
from sortedchat.outputs import check_output_file, write_or_rescue


def register(app: typer.Typer) -> None:
    app.command()(bench)


@takes_groups
def bench(
    *,
    model: o.ModelOpt = None,
    prompts: Annotated[Optional[Path], typer.Option("--prompts", help="Prompt file: .txt (one per line), .jsonl or "
                                                       ".json [default: the built-in set]")] = None,
    max_new_tokens: o.MaxTokensOpt = 128,
    repeat: Annotated[int, typer.Option("--repeat", "-r", help="Timed repeats of every mode on every prompt")] = 3,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write the results as JSON to this file")] = None,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="Write a speed-vs-agreement plot (PNG)")] = None,
    modes: Annotated[Optional[str], typer.Option("--modes", help="Only these modes besides hf and full, "
                                                 "comma-separated (e.g. hf-ee:24,depth:24,auto,auto:propagate,"
                                                 "spec:24,draft:24) [default: all]")] = None,
    clock: Annotated[str, typer.Option("--clock", help="wall, or cpu: this process's CPU time (with --threads 1, "
                                       "leaves out waiting for a core on a busy machine)")] = "wall",
    load: o.LoadFlags,
) -> None:
    """Time every decoding mode against transformers' generate on the same prompts, in one process."""
    from sortedchat.bench import run_bench
    from sortedchat.bench.peer import gguf_for
    from sortedchat.bench.prompts import load_prompts
    from sortedchat.bench.report import print_table, write_json, write_plot

    _check_arguments(clock, repeat, max_new_tokens, json_out, plot)
    only = [m.strip() for m in modes.split(",") if m.strip()] if modes is not None else None
    conversations = load_prompts(prompts)
    check_before_loading(model, load)
    sm = o.load_model(model, load.load_options())
    err = Console(stderr=True)
    with err.status("benchmarking", spinner="dots") as status:
        meta, rows = run_bench(sm, conversations, max_new_tokens, repeat, clock, progress=status.update, modes=only,
                               peer_gguf=gguf_for(model))
    if meta["peer"]["skipped"]:
        err.print(f"llama.cpp row skipped: {meta['peer']['skipped']}", markup=False, highlight=False, soft_wrap=True)
    elif meta["peer"]["prompt_batch"] == 1:
        err.print("llama.cpp crashed on a batched prompt here: its prompts went in one token at a time (its whole "
                  "answers are slower for it; decoding alone compares the engines)",
                  highlight=False, soft_wrap=True)
    meta["command"] = " ".join(["sortedchat", *sys.argv[1:]])
    threads, quantization = meta["machine"]["torch_threads"], meta["quantization"]
    weights = meta["dtype"] if quantization == "none" else f"{meta['dtype']}, {quantization} products"
    title = (f"{meta['model']} · {weights} on {meta['device']} ({threads} thread{'s' * (threads != 1)}) · "
             f"{len(conversations)} prompts × {max_new_tokens} tokens × {repeat} repeats · {clock} clock · load "
             f"{meta['load_average']['before']} → {meta['load_average']['after']}")
    print_table(rows, title)
    if json_out is not None:
        write_or_rescue(json_out, "--json", lambda path: write_json(path, meta, rows))
        err.print(f"wrote {json_out}")
    if plot is not None:
        write_plot(plot, rows, title)
        err.print(f"wrote {plot}")


def _check_arguments(clock: str, repeat: int, max_new_tokens: int, json_out: Path | None, plot: Path | None) -> None:
    """Before anything loads: the numbers, and the output files' names and folders."""
    if clock not in ("wall", "cpu"):
        raise SortedChatError(f"--clock {clock}: choose wall or cpu")
    if repeat < 1:
        raise SortedChatError(f"--repeat {repeat}: must be at least 1")
    if max_new_tokens < 1:
        raise SortedChatError(f"--max-new-tokens {max_new_tokens}: must be at least 1")
    for flag, path, suffix in (("--json", json_out, ".json"), ("--plot", plot, ".png")):
        if path is not None and path.suffix.lower() != suffix:
            raise SortedChatError(f"{flag} {path}: expected a {suffix} file name")
        if path is not None:
            check_output_file(path, flag)
