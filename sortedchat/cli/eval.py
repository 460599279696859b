"""`sortedchat eval`: per-exit quality of one or more models, side by side."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from sortedchat import SortedChatError
from sortedchat.cli import options as o
from sortedchat.cli.option_groups import takes_groups
from sortedchat.outputs import check_output_file, write_or_rescue


def register(app: typer.Typer) -> None:
    app.command("eval")(evaluate)


@takes_groups
def evaluate(
    *,
    model: Annotated[list[str], typer.Option("--model", "-m", help="Model to evaluate; repeat to compare "
                                             "('default' = the default chat model)")],
    data: Annotated[str, typer.Option("--data", help="Evaluation data (Alpaca, chat or QA records; any format "
                                      "train accepts)")],
    holdout: o.HoldoutOpt = 0,
    limit: o.LimitOpt = 0,
    template: Annotated[Optional[str], typer.Option("--template", help="chat or alpaca (default: what each "
                                                    "model was trained with, else chat)")] = None,
    max_length: Annotated[int, typer.Option("--max-length", help="Tokens per sequence")] = 512,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Sequences per forward pass")] = 8,
    qa: Annotated[Optional[bool], typer.Option("--qa/--no-qa", help="Closed-book exact match per exit "
                                               "(default: on for QA data)")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="QA: answer length limit")] = 24,
    json_out: Annotated[Path, typer.Option("--json", help="Where to write the results")] = Path("sortedchat-eval.json"),
    plot: Annotated[Optional[Path], typer.Option("--plot", help="Write a plot of quality against depth (PNG)")] = None,
    skip_bad: Annotated[bool, typer.Option("--skip-bad", help="Skip malformed records (counted)")] = False,
    load: o.LoadFlags,
) -> None:
    """Per exit and per model: response-token CE, perplexity, top-1, agreement with the last exit (and QA EM).
    With --quantize int8|int4, each model loads in float32 (int4: an adapter unmerged), gives its full depth's
    top-1 on every response token, is quantized, and is scored: the =f32 column is each exit's agreement with
    float32 full depth."""
    from sortedchat.config import atomic_write_text
    from sortedchat.loading import resolved
    from sortedchat.training import evaluate as ev
    from sortedchat.training.data import RecordSet, last_records, load_records

    _check_arguments(template, holdout, limit, json_out, plot)
    o.warn_of_threads(load.threads)
    opts = load.load_options()
    resolved(opts)  # --quantize against the other options, before the data loads
    records = load_records(data, skip_bad, "--data")
    examples = last_records(records.examples, holdout, limit, data)
    subset = RecordSet(examples, records.source, records.kind, records.sha256, records.skipped)
    use_qa = records.kind == "qa" if qa is None else qa
    if use_qa and not all(ex.aliases for ex in examples):
        raise SortedChatError(f"--qa: {data} holds {records.kind} records, not question/answer records")
    # quantized after the reference, from the weights it quantizes (int4 keeps an adapter beside its blocks)
    results = score_models(model, dataclasses.replace(opts, quantize=None, unmerged=opts.quantize == "int4"),
                           steps=lambda sm: len(examples) * (1 + bool(opts.quantize)
                                                             + (len(sm.exits) if use_qa else 0)),
                           score=lambda sm, tick: ev.evaluate_model(sm, subset, template, max_length, batch_size,
                                                                    use_qa, max_new_tokens, tick=tick,
                                                                    quantize=opts.quantize))
    described = subset.describe() | {"holdout": holdout, "limit": limit}
    title = f"{records.source}: {len(examples)} records" + (f" (last {holdout})" if holdout else "")
    Console(highlight=False).print(ev.results_table(results, title))
    text = json.dumps(ev.to_json(results, described), indent=2, ensure_ascii=False) + "\n"
    write_or_rescue(json_out, "--json", lambda path: atomic_write_text(path, text))
    console = Console(stderr=True, highlight=False)
    console.print(f"results written to {json_out}")
    if plot is not None:
        console.print(f"plot written to {ev.plot_results(results, plot, title)}")


def _check_arguments(template: str | None, holdout: int, limit: int, json_out: Path, plot: Path | None) -> None:
    """Before the data and the models load (`last_records` checks --holdout against the data)."""
    if template is not None and template not in ("chat", "alpaca"):
        raise SortedChatError(f"--template: {template!r} is not one of chat, alpaca")
    if holdout < 0 or limit < 0:
        raise SortedChatError("--holdout/--limit: must not be negative")
    check_output_file(json_out, "--json")
    if plot is not None:
        check_output_file(plot, "--plot")


def score_models(specs: list[str], opts, steps, score) -> list[dict]:
    """`score(sm, tick)` of each model in turn behind a progress bar of `steps(sm)`; one model in memory at a time."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from sortedchat.training.evaluate import short_name

    console = Console(stderr=True, highlight=False)
    results = []
    for spec in specs:
        sm = o.load_model(None if spec == "default" else spec, opts, console)
        with Progress(TextColumn(f"[bold]{short_name(spec, len(results))}"), BarColumn(), MofNCompleteColumn(),
                      TimeRemainingColumn(), console=console, transient=True, disable=not console.is_terminal) as bar:
            task = bar.add_task("eval", total=steps(sm))
            result = score(sm, lambda n: bar.advance(task, n))
        result["model"] = spec
        results.append(result)
        del sm
    return results
