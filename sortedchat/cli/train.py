"""`sortedchat train` (SoFT and the paper's baselines) and `sortedchat eval` (per-exit quality, side by side).

Every `train` option may also come from a TOML recipe (`--recipe`); a flag given on the command line wins,
so train options default to None here and the real defaults live in `TrainOptions`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from sortedchat import SortedChatError
from sortedchat.cli import options as o
from sortedchat.outputs import check_output_dir, check_output_file, write_or_rescue


def register(app: typer.Typer) -> None:
    app.command()(train)
    app.command("eval")(evaluate)


def _default(name: str) -> str:
    from sortedchat.training.recipe import TrainOptions

    value = TrainOptions.__dataclass_fields__[name].default
    return "" if value in (None, "") else f" (default: {value})"


def _opt(flag: str, help: str, name: str | None = None, **kw):
    name = name or flag.lstrip("-").replace("-", "_").split("/")[0]
    return typer.Option(flag, help=help + _default(name), show_default=False, **kw)


def train(
    model: Annotated[Optional[str], _opt("--model", "Starting model: 'default' (built-in SmolLM2-135M-Instruct "
                                         "base), HF directory, sortedchat checkpoint, .gguf or hub id")] = None,
    data: Annotated[Optional[str], _opt("--data", "Training data: Alpaca JSON/JSONL, chat JSONL, QA JSONL, "
                                        "parquet/CSV, or a datasets hub id: name, name:config, name:config@split")] = None,
    out: Annotated[Optional[str], _opt("--out", "Output directory")] = None,
    recipe: Annotated[Optional[Path], typer.Option("--recipe", help="TOML recipe; command-line flags win")] = None,
    eval_data: Annotated[Optional[str], _opt("--eval-data", "Evaluation data (same formats as --data)")] = None,
    holdout: Annotated[Optional[int], _opt("--holdout", "Hold out the last N records of --data for evaluation")] = None,
    template: Annotated[Optional[str], _opt("--template", "Prompt template: chat (the model's) or alpaca")] = None,
    skip_bad: Annotated[Optional[bool], _opt("--skip-bad/--no-skip-bad", "Skip malformed records (counted) "
                                             "instead of stopping")] = None,
    exits: Annotated[Optional[str], _opt("--exits", "Exit layers, e.g. 9,12,15,...,30 (default: the model's, "
                                         "else 8 spread from 30% depth)")] = None,
    method: Annotated[Optional[str], _opt("--method", "soft (all exits), sft (last exit), ict (frozen model, "
                                          "new head per exit), lens (frozen model, affine lens per exit)")] = None,
    objective: Annotated[Optional[str], _opt("--objective", "ce, kd (distil the frozen start's full depth) "
                                             "or ce+kd")] = None,
    exit_weights: Annotated[Optional[str], _opt("--exit-weights", "Loss weight per trained exit, e.g. 1,1,2")] = None,
    exits_per_step: Annotated[Optional[int], _opt("--exits-per-step", "Sample N exits per step, always "
                                                  "with the last (0 = all)")] = None,
    lenses: Annotated[Optional[bool], _opt("--lenses/--no-lenses", "Train a per-exit affine lens (before the "
                                           "shared norm and head) with the model")] = None,
    lens_lr: Annotated[Optional[float], _opt("--lens-lr", "Learning rate of the lenses (0 = --lr)")] = None,
    kd_top_k: Annotated[Optional[int], _opt("--kd-top-k", "Distil from the teacher's cached top-K ids "
                                            "(candidate-set losses; 0 = exact full-vocabulary losses)")] = None,
    kd_negatives: Annotated[Optional[int], _opt("--kd-negatives", "Sampled ids per step for the rest of the "
                                                "vocabulary (with --kd-top-k)")] = None,
    pack: Annotated[Optional[bool], _opt("--pack/--no-pack", "Pack records into rows of --max-length "
                                         "instead of padding each")] = None,
    layer_dropout: Annotated[Optional[float], _opt("--layer-dropout", "LayerSkip layer dropout: the last layer "
                                                   "skipped at this rate per step, rising from 0 at the first")] = None,
    epochs: Annotated[Optional[int], _opt("--epochs", "Passes over the data")] = None,
    max_steps: Annotated[Optional[int], _opt("--max-steps", "Optimizer steps; overrides --epochs")] = None,
    lr: Annotated[Optional[float], _opt("--lr", "Peak learning rate")] = None,
    schedule: Annotated[Optional[str], _opt("--schedule", "cosine, linear or constant (after warmup)")] = None,
    warmup_ratio: Annotated[Optional[float], _opt("--warmup-ratio", "Warmup as a fraction of the steps")] = None,
    warmup_steps: Annotated[Optional[int], _opt("--warmup-steps", "Warmup steps; overrides --warmup-ratio")] = None,
    weight_decay: Annotated[Optional[float], _opt("--weight-decay", "AdamW weight decay")] = None,
    max_grad_norm: Annotated[Optional[float], _opt("--max-grad-norm", "Gradient clipping (0 = off)")] = None,
    batch_size: Annotated[Optional[int], _opt("--batch-size", "Sequences per process per micro-batch")] = None,
    grad_accum: Annotated[Optional[int], _opt("--grad-accum", "Micro-batches per optimizer step")] = None,
    max_length: Annotated[Optional[int], _opt("--max-length", "Tokens per sequence (longer ones are cut)")] = None,
    seed: Annotated[Optional[int], _opt("--seed", "Seed for data order, exit sampling and initialisation")] = None,
    eval_interval: Annotated[Optional[int], _opt("--eval-interval", "Evaluate every N steps (0 = at the end)")] = None,
    save_interval: Annotated[Optional[int], _opt("--save-interval", "Checkpoint every N steps (0 = at the end)")] = None,
    log_interval: Annotated[Optional[int], _opt("--log-interval", "Log to metrics.jsonl every N steps")] = None,
    keep_checkpoints: Annotated[Optional[int], _opt("--keep-checkpoints", "Checkpoints kept")] = None,
    lora: Annotated[Optional[bool], _opt("--lora/--no-lora", "Train a LoRA adapter instead of all weights")] = None,
    lora_rank: Annotated[Optional[int], _opt("--lora-rank", "LoRA rank")] = None,
    lora_alpha: Annotated[Optional[int], _opt("--lora-alpha", "LoRA alpha")] = None,
    lora_dropout: Annotated[Optional[float], _opt("--lora-dropout", "LoRA dropout")] = None,
    lora_targets: Annotated[Optional[str], _opt("--lora-targets", "Modules to adapt: all-linear or names, "
                                                "e.g. q_proj,v_proj")] = None,
    lora_modules_to_save: Annotated[Optional[str], _opt("--lora-modules-to-save", "Modules trained in full "
                                                        "beside the adapter, e.g. model.norm (the shared final norm)")] = None,
    merge: Annotated[Optional[bool], _opt("--merge/--no-merge", "Write merged weights instead of the adapter")] = None,
    load_in_4bit: Annotated[Optional[bool], _opt("--load-in-4bit/--no-load-in-4bit", "QLoRA: 4-bit base "
                                                 "(bitsandbytes, GPU)")] = None,
    load_in_8bit: Annotated[Optional[bool], _opt("--load-in-8bit/--no-load-in-8bit", "8-bit base")] = None,
    gradient_checkpointing: Annotated[Optional[bool], _opt("--gradient-checkpointing/--no-gradient-checkpointing",
                                                           "Recompute activations in backward (less memory)")] = None,
    mixed_precision: Annotated[Optional[str], _opt("--mixed-precision", "no, bf16 or fp16 (default: accelerate's "
                                                   "launch config, else no)")] = None,
    device: Annotated[Optional[str], _opt("--device", "auto, cpu or cuda (several GPUs: accelerate launch)")] = None,
    trust_remote_code: o.TrustOpt = False,
    allow_pickle: o.PickleOpt = False,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run saved in --out from its newest "
                                         "checkpoint")] = False,
) -> None:
    """Fine-tune so that every exit works (SoFT), or run the paper's SFT / SFT+ICT baselines."""
    cli = dict(locals())  # first: every parameter, nothing else
    cli.pop("recipe")
    from sortedchat.training.recipe import coerce_option, resolve_options
    from sortedchat.training.trainer import train as run_training

    cli["trust_remote_code"] = trust_remote_code or None
    cli["allow_pickle"] = allow_pickle or None
    cli["resume"] = resume
    if exits is not None:
        cli["exits"] = coerce_option("exits", exits, "--exits")
    if exit_weights is not None:
        cli["exit_weights"] = coerce_option("exit_weights", exit_weights, "--exit-weights")
    opts = resolve_options(cli, str(recipe) if recipe else None)
    check_output_dir(opts.out, "--out")
    result = run_training(opts)
    if result.interrupted:
        import sys

        print(f"interrupted at step {result.step}/{result.total_steps}; checkpoint saved in {result.checkpoint}. "
              f"Run the same command with --resume to continue.", file=sys.stderr)
        raise typer.Exit(130)


def evaluate(
    model: Annotated[list[str], typer.Option("--model", "-m", help="Model to evaluate; repeat to compare "
                                             "('default' = the default chat model)")],
    data: Annotated[str, typer.Option("--data", help="Evaluation data (Alpaca, chat or QA records; any format "
                                      "train accepts)")],
    holdout: Annotated[int, typer.Option("--holdout", help="Use only the last N records (what train --holdout N "
                                         "held out)")] = 0,
    limit: Annotated[int, typer.Option("--limit", help="Use at most N records (after --holdout)")] = 0,
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
    exits: o.ExitsOpt = None,
    device: o.DeviceOpt = "auto",
    dtype: o.DtypeOpt = "auto",
    load_in_4bit: o.Load4Opt = False,
    load_in_8bit: o.Load8Opt = False,
    trust_remote_code: o.TrustOpt = False,
    allow_pickle: o.PickleOpt = False,
) -> None:
    """Per exit and per model: response-token CE, perplexity, top-1, agreement with the last exit (and QA EM)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from sortedchat.config import atomic_write_text
    from sortedchat.training import evaluate as ev
    from sortedchat.training.data import RecordSet, load_records

    if template is not None and template not in ("chat", "alpaca"):
        raise SortedChatError(f"--template: {template!r} is not one of chat, alpaca")
    if holdout < 0 or limit < 0:
        raise SortedChatError("--holdout/--limit: must not be negative")
    check_output_file(json_out, "--json")
    if plot is not None:
        check_output_file(plot, "--plot")
    records = load_records(data, skip_bad, "--data")
    examples = records.examples
    if holdout:
        if holdout > len(examples):
            raise SortedChatError(f"--holdout {holdout}: {data} has only {len(examples)} usable records")
        examples = examples[-holdout:]
    if limit:
        examples = examples[:limit]
    subset = RecordSet(examples, records.source, records.kind, records.sha256, records.skipped)
    use_qa = records.kind == "qa" if qa is None else qa
    if use_qa and not all(ex.aliases for ex in examples):
        raise SortedChatError(f"--qa: {data} holds {records.kind} records, not question/answer records")
    opts = o.load_options(device, dtype, load_in_4bit, load_in_8bit, trust_remote_code, allow_pickle, exits)
    console = Console(stderr=True, highlight=False)
    results = []
    for spec in model:
        sm = o.load_model(None if spec == "default" else spec, opts, console)
        steps = len(examples) * (1 + (len(sm.exits) if use_qa else 0))
        with Progress(TextColumn(f"[bold]{ev.short_name(spec, len(results))}"), BarColumn(), MofNCompleteColumn(),
                      TimeRemainingColumn(), console=console, transient=True, disable=not console.is_terminal) as bar:
            task = bar.add_task("eval", total=steps)
            result = ev.evaluate_model(sm, subset, template, max_length, batch_size, use_qa, max_new_tokens,
                                       tick=lambda n: bar.advance(task, n))
        result["model"] = spec
        results.append(result)
        del sm
    described = subset.describe() | {"holdout": holdout, "limit": limit}
    title = f"{records.source}: {len(examples)} records" + (f" (last {holdout})" if holdout else "")
    Console(highlight=False).print(ev.results_table(results, title))
    payload = ev.to_json(results, described)
    text = json.dumps(payload, indent=2, ensure_ascii=False) + "\n"
    write_or_rescue(json_out, "--json", lambda path: atomic_write_text(path, text))
    console.print(f"results written to {json_out}")
    if plot is not None:
        console.print(f"plot written to {ev.plot_results(results, plot, title)}")
