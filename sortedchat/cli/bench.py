"""`sortedchat bench` (every mode against transformers' generate) and `sortedchat calibrate` (auto thresholds)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from sortedchat import SortedChatError
from sortedchat.cli import options as o
from sortedchat.outputs import check_output_file, write_or_rescue

ThreadsOpt = Annotated[Optional[int], typer.Option("--threads", help="CPU threads for torch [default: torch's]")]


def register(app: typer.Typer) -> None:
    app.command()(bench)
    app.command()(calibrate)


def _threads(threads: int | None) -> None:
    import torch

    if threads is not None:
        if threads < 1:
            raise SortedChatError(f"--threads {threads}: must be at least 1")
        torch.set_num_threads(threads)


def bench(
    model: o.ModelOpt = None,
    prompts: Annotated[Optional[Path], typer.Option("--prompts", help="Prompt file: .txt (one per line), .jsonl or .json [default: the built-in set]")] = None,
    max_new_tokens: o.MaxTokensOpt = 128,
    repeat: Annotated[int, typer.Option("--repeat", "-r", help="Timed repeats of every mode on every prompt")] = 3,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write the results as JSON to this file")] = None,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="Write a speed-vs-agreement plot (PNG)")] = None,
    modes: Annotated[Optional[str], typer.Option("--modes", help="Only these modes besides hf and full, comma-separated "
                                                 "(e.g. hf-ee:24,depth:24,auto,auto:propagate,spec:24,draft:24) [default: all]")] = None,
    threads: ThreadsOpt = None,
    clock: Annotated[str, typer.Option("--clock", help="wall, or cpu: this process's CPU time (with --threads 1, "
                                       "leaves out waiting for a core on a busy machine)")] = "wall",
    device: o.DeviceOpt = "auto",
    dtype: o.DtypeOpt = "auto",
    load_in_4bit: o.Load4Opt = False,
    load_in_8bit: o.Load8Opt = False,
    trust_remote_code: o.TrustOpt = False,
    allow_pickle: o.PickleOpt = False,
    exits: o.ExitsOpt = None,
) -> None:
    """Time every decoding mode against transformers' generate on the same prompts, in one process."""
    from sortedchat.bench import run_bench
    from sortedchat.bench.prompts import load_prompts
    from sortedchat.bench.report import print_table, write_json, write_plot

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
    only = [m.strip() for m in modes.split(",") if m.strip()] if modes is not None else None
    _threads(threads)
    conversations = load_prompts(prompts)
    o.check_before_loading(model, exits)
    opts = o.load_options(device, dtype, load_in_4bit, load_in_8bit, trust_remote_code, allow_pickle, exits)
    sm = o.load_model(model, opts)
    err = Console(stderr=True)
    with err.status("benchmarking", spinner="dots") as status:
        meta, rows = run_bench(sm, conversations, max_new_tokens, repeat, clock, progress=status.update, modes=only)
    meta["command"] = " ".join(["sortedchat", *sys.argv[1:]])
    title = (f"{meta['model']} · {meta['dtype']} on {meta['device']} ({meta['machine']['torch_threads']} threads) · "
             f"{len(conversations)} prompts × {max_new_tokens} tokens × {repeat} repeats · {clock} clock · load "
             f"{meta['load_average']['before']} → {meta['load_average']['after']}")
    print_table(rows, title)
    if json_out is not None:
        write_or_rescue(json_out, "--json", lambda path: write_json(path, meta, rows))
        err.print(f"wrote {json_out}")
    if plot is not None:
        write_plot(plot, rows, title)
        err.print(f"wrote {plot}")


def calibrate(
    data: Annotated[str, typer.Option("--data", help="Held-out reference answers: Alpaca/chat/QA JSON or JSONL, or plain text (.txt)")],
    model: o.ModelOpt = None,
    target_agreement: Annotated[float, typer.Option("--target-agreement", help="Share of tokens auto mode must pick as the full model does (teacher-forced)")] = 0.95,
    measure: Annotated[Optional[str], typer.Option("--measure", help="maxprob, subset, classifier or saturation [default: the fastest at the target]")] = None,
    kv: Annotated[str, typer.Option("--kv", help="Calibrate auto mode with exact K/V, or with propagated K/V "
                                    "(agreement measured under propagation, token by token: slower)")] = "exact",
    holdout: Annotated[int, typer.Option("--holdout", help="Use only the last N records (what `train --holdout N` left out)")] = 0,
    max_examples: Annotated[int, typer.Option("--max-examples", help="Use at most this many records (after --holdout)")] = 300,
    threads: ThreadsOpt = None,
    device: o.DeviceOpt = "auto",
    dtype: o.DtypeOpt = "auto",
    trust_remote_code: o.TrustOpt = False,
    allow_pickle: o.PickleOpt = False,
    exits: o.ExitsOpt = None,
) -> None:
    """Choose per-exit auto thresholds (and train the exit classifier) for a target agreement; write them
    into the model's sortedchat.json."""
    from sortedchat import calibrate as cal

    cal.check_options(target_agreement, measure, max_examples, kv)
    _threads(threads)
    o.check_before_loading(model, exits)
    opts = o.load_options(device, dtype, False, False, trust_remote_code, allow_pickle, exits)
    sm = o.load_model(model, opts)
    cal.checkpoint_dir(sm)  # fail before the long part
    err = Console(stderr=True)
    with err.status("calibrating", spinner="dots") as status:
        result = cal.calibrate(sm, data, target_agreement, measure, max_examples, holdout,
                               progress=lambda stage, frac=None: status.update(stage), kv=kv)
    console = Console()
    full_ms = result.costs.token(sm.num_layers) * 1e3
    console.print(f"[dim]{sm.source} · {result.positions['report']} held-out answer tokens · one layer "
                  f"{result.costs.layer * 1e3:.2f} ms (one more position {result.costs.drain:.0%} of it, its propagated "
                  f"K/V {result.costs.kv_fill / max(result.costs.layer, 1e-12):.0%}), head "
                  f"{result.costs.head * 1e3:.2f} ms, full token "
                  f"{full_ms:.1f} ms (without overhead)[/dim]")
    how = "teacher-forced" if kv == "exact" else "teacher-forced with propagated K/V, agreement with the exact model"
    summary = Table(title=f"auto mode, {kv} K/V, at target agreement {target_agreement:.0%} (held-out, {how})",
                    title_justify="left")
    for col in ("measure", "check ms", "checks/token", "check cost", "mean exit", "agreement", "expected ×"):
        summary.add_column(col, justify="left" if col == "measure" else "right")
    for name, p in result.plans.items():
        mark = " ✓" if p is result.chosen else ""
        summary.add_row(f"{name}{mark}", f"{result.costs.check.get(name, 0) * 1e3:.3f}", f"{p.checks_per_token:.2f}",
                        f"{p.check_share:.1%}", f"{p.mean_exit:.1f}", f"{p.agreement:.1%}", f"{p.speedup:.2f}")
    console.print(summary)
    if result.start is not None:
        s = result.start
        console.print(f"[dim]started from the one-pass (exact K/V) plan of {s.measure}: agreement {s.agreement:.1%}, "
                      f"expected {s.speedup:.2f}× with propagation's costs[/dim]")
    per_exit = Table(title=f"thresholds ({result.chosen.measure})", title_justify="left")
    for col in ("exit", "threshold", "tokens leaving here", "their agreement"):
        per_exit.add_column(col, justify="right")
    for e, v in result.chosen.per_exit.items():
        tau = "not checked" if v["threshold"] >= 1.0 else f"{v['threshold']:.4f}"
        agree = "–" if v["agreement"] is None else f"{v['agreement']:.1%}"
        per_exit.add_row(str(e), tau, f"{v['share']:.1%}", agree)
    console.print(per_exit)
    for path in cal.write(sm, result, target_agreement):
        console.print(f"wrote {path}")
