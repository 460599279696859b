"""What a SoFT training step costs relative to an SFT step: time and peak memory, measured in one process.

Each method gets its own `Trainer` (same model, data, batches and settings; only the loss differs), runs a
warm-up step, then timed steps on the same global batches. Rounds alternate the methods so that a noisy
neighbour on a shared machine hits both. Peak memory is the GPU allocator's peak on CUDA; on a CPU it is
the peak resident set size sampled during the timed steps (after returning freed heap to the system), shown
both in total and above the level right before the first timed step.

    python benchmarks/train_cost.py --data ../shared/data/alpaca_1800.json
    python benchmarks/train_cost.py --data D --variant soft --variant soft:4 --lora --mixed-precision bf16
    python benchmarks/train_cost.py --data D --lora --variant "soft,objective=ce+kd" \
        --variant "soft,objective=kd,kd_top_k=64,pack=true"

A variant is `sft`, `soft` (every exit every step) or `soft:N` (`--exits-per-step N`), optionally followed
by `,option=value` pairs of `sortedchat train` (underscores, as in a recipe): the cheap top-K distillation
against today's exact ce+kd, lenses, packing. The SFT row is always plain CE on the last exit.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import tempfile
import threading
import time
from typing import Annotated, Optional

import torch
import typer
from rich.console import Console
from rich.table import Table

from sortedchat.training.recipe import coerce_option, resolve_options
from sortedchat.training.trainer import Trainer


class PeakMemory:
    """Peak memory while inside the block: CUDA allocator peak, or sampled RSS on a CPU."""

    def __init__(self, device: torch.device, interval: float = 0.002):
        self.device, self.interval = device, interval
        self.peak = self.start = 0

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _sample(self) -> None:
        while not self._done.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(self.interval)

    def __enter__(self) -> "PeakMemory":
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
            return self
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed heap of the previous method back to the system
        except OSError:
            pass
        self.start = self.peak = self.rss()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
            return
        self._done.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())


def measure(variant: str, base: dict, steps: int, first_step: int) -> dict:
    """Set up a trainer for `variant`, warm it up, then time `steps` steps and watch memory."""
    head, *pairs = variant.split(",")
    method, _, per_step = head.partition(":")
    extra = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        try:
            value = json.loads(value)  # 64, 0.5, true; anything else stays a string (ce+kd)
        except ValueError:
            pass
        extra[key] = coerce_option(key, value, f"--variant {variant}")
    with tempfile.TemporaryDirectory() as out:
        opts = resolve_options(base | {"method": method, "exits_per_step": int(per_step or 0), "out": out} | extra)
        trainer = Trainer(opts, Console(file=open(os.devnull, "w"))).setup()
        trainer.train_step(first_step)  # warm-up: allocates optimizer state, first-call overheads
        times, tokens = [], 0
        with PeakMemory(trainer.acc.device) as mem:
            for s in range(first_step + 1, first_step + 1 + steps):
                if trainer.acc.device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                tokens += trainer.train_step(s)["tokens"]
                if trainer.acc.device.type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
        result = {"times": times, "tokens": tokens, "peak": mem.peak, "start": mem.start,
                  "exits": trainer.loss_exits, "device": str(trainer.acc.device)}
    del trainer
    gc.collect()
    return result


def main(
    data: Annotated[str, typer.Option("--data", help="Training data (any format `sortedchat train` reads)")],
    model: Annotated[str, typer.Option("--model", help="Model ('default' = built-in SmolLM2-135M base)")] = "default",
    variant: Annotated[Optional[list[str]], typer.Option("--variant", help="sft, soft or soft:N; repeatable "
                                                         "(default: soft, soft:4)")] = None,
    steps: Annotated[int, typer.Option("--steps", help="Timed steps per method per round")] = 3,
    rounds: Annotated[int, typer.Option("--rounds", help="Rounds over all methods")] = 2,
    batch_size: Annotated[int, typer.Option("--batch-size")] = 8,
    max_length: Annotated[int, typer.Option("--max-length")] = 256,
    exits: Annotated[Optional[str], typer.Option("--exits", help="Exit layers (default: the model's)")] = None,
    lora: Annotated[bool, typer.Option("--lora", help="Train LoRA adapters instead of all weights")] = False,
    mixed_precision: Annotated[str, typer.Option("--mixed-precision", help="no or bf16")] = "no",
    gradient_checkpointing: Annotated[bool, typer.Option("--gradient-checkpointing")] = False,
    device: Annotated[str, typer.Option("--device")] = "auto",
    threads: Annotated[int, typer.Option("--threads", help="torch CPU threads (0 = torch's default)")] = 0,
) -> None:
    """Print SoFT/SFT step-time and peak-memory ratios."""
    if threads:
        torch.set_num_threads(threads)
    variants = ["sft"] + [v for v in (variant or ["soft", "soft:4"]) if v != "sft"]
    base = {"model": model, "data": data, "batch_size": batch_size, "max_length": max_length, "lora": lora,
            "lr": 1e-5, "warmup_steps": 0, "max_steps": 10_000, "mixed_precision": mixed_precision,
            "gradient_checkpointing": gradient_checkpointing, "device": device, "epochs": 1,
            "exits": [int(x) for x in exits.split(",")] if exits else None}
    console = Console(highlight=False)
    results: dict[str, list[dict]] = {v: [] for v in variants}
    for r in range(rounds):
        for v in variants:
            res = measure(v, base, steps, first_step=r * (steps + 1))
            results[v].append(res)
            console.print(f"round {r + 1}: {v:8s} {sum(res['times']) / len(res['times']):.2f} s/step, "
                          f"peak {res['peak'] / 2**30:.2f} GiB")
    table = Table(title=f"train step cost on {results['sft'][0]['device']} · model {model} · batch {batch_size} · "
                  f"max length {max_length} · {'LoRA' if lora else 'full'} · precision {mixed_precision} · "
                  f"{torch.get_num_threads()} threads", title_justify="left")
    for col in ("method", "exits trained", "s/step", "vs SFT", "tok/s", "peak GiB", "vs SFT", "above start GiB",
                "vs SFT"):
        table.add_column(col, justify="right")

    def summary(v):
        """Mean seconds per step over every timed step: all methods ran the very same steps."""
        times = [t for res in results[v] for t in res["times"]]
        peak = max(res["peak"] for res in results[v])
        above = max(res["peak"] - res["start"] for res in results[v])
        tokens = sum(res["tokens"] for res in results[v])
        return sum(times) / len(times), peak, above, tokens / sum(times)

    t_sft, p_sft, a_sft, _ = summary("sft")
    for v in variants:
        t, p, a, rate = summary(v)
        exits_trained = results[v][0]["exits"]
        per_step = v.split(",")[0].partition(":")[2]
        label = f"{per_step or len(exits_trained)} of {len(exits_trained)}"
        table.add_row(v, label if v != "sft" else "last", f"{t:.2f}", f"{t / t_sft:.2f}x", f"{rate:,.0f}",
                      f"{p / 2**30:.2f}", f"{p / p_sft:.2f}x", f"{a / 2**30:.2f}", f"{a / max(a_sft, 1):.2f}x")
    console.print(table)


if __name__ == "__main__":
    typer.run(main)
