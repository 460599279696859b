"""Throughput inside the chat app against `sortedchat ask`, same model, prompt, mode and token budget.

Both run in this process on one loaded model. The `ask` side is the command's own loop (a fresh
`ChatSession`, every event printed by its `AnswerPrinter` to a terminal console whose output is
discarded). The app side is the real `SortedChatApp`, headless through Textual's test driver: the
prompt is typed and sent, the generation thread saves every token to SQLite, and the UI drains the
events into the screen at 30 Hz while the model runs. Each run starts a new chat, so neither side
reuses a cached prompt. Rounds alternate the two so a noisy neighbour hits both; a first round of each
is a warm-up and not counted. The figure is the engine's decode tokens/s (prefill excluded), median
over the rounds, and the printed ratio is app / ask.

    python benchmarks/app_vs_ask.py                      # default model, 128 tokens, greedy, full depth
    python benchmarks/app_vs_ask.py --depth 15 --rounds 5 --model path/to/checkpoint
"""

from __future__ import annotations

import asyncio
import io
import statistics
import tempfile
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from sortedchat.cli.render import AnswerPrinter
from sortedchat.engine import ChatSession, Mode, SamplingConfig
from sortedchat.loading import LoadOptions, load_sorted_model
from sortedchat.tui.app import SortedChatApp
from sortedchat.tui.settings import Settings
from sortedchat.tui.storage import ChatStore

PROMPT = "Write a long story about a dragon who learns to cook."


def ask_run(sm, mode: Mode, sampling: SamplingConfig) -> tuple[float, int]:
    session = ChatSession(sm, mode)
    printer = AnswerPrinter(sm.num_layers, sm.exits[0], console=Console(file=io.StringIO(), force_terminal=True))
    for ev in session.generate([{"role": "user", "content": PROMPT}], sampling):
        printer.token(ev)
    printer.summary(session.last_stats)
    return session.last_stats.tokens_per_second, session.last_stats.tokens


async def app_runs(sm, mode: Mode, sampling: SamplingConfig, rounds: int, ask_results: list, workdir: Path):
    """One app instance, a new chat per round; each round first runs `ask` for the alternation.
    Round 0 is the warm-up of both."""
    settings = Settings(temperature=sampling.temperature, max_new_tokens=sampling.max_new_tokens)
    app = SortedChatApp(model=sm, initial_mode=lambda _: mode, settings=settings,
                        store=ChatStore(workdir / "chats.sqlite3"), export_dir=workdir)
    results = []
    async with app.run_test(size=(120, 40)) as pilot:
        for round_no in range(rounds + 1):
            ask_results.append(ask_run(sm, mode, sampling))
            await app.action_new_chat()
            app.chat.prompt.text = PROMPT
            await pilot.press("enter")
            while app.generating or app.stats is None:
                await pilot.pause(0.05)
            results.append((app.stats.tokens_per_second, app.stats.tokens))
            name = f"round {round_no}" if round_no else "warm-up"
            (ask_tps, ask_n), (app_tps, app_n) = ask_results[-1], results[-1]
            print(f"  {name}: ask {ask_tps:7.2f} tok/s ({ask_n} tokens)   app {app_tps:7.2f} tok/s ({app_n} tokens)",
                  flush=True)
    del ask_results[0], results[0]
    return results


def main(
    model: Annotated[Optional[str], typer.Option(help="--model as for sortedchat (default: built-in)")] = None,
    depth: Annotated[Optional[int], typer.Option(help="Fixed depth (default: full)")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n")] = 128,
    rounds: Annotated[int, typer.Option(help="Alternating rounds of each")] = 3,
    device: Annotated[str, typer.Option()] = "cpu",
) -> None:
    sm = load_sorted_model(model, LoadOptions(device=device))
    mode = Mode.fixed(depth).validate(sm.num_layers)
    sampling = SamplingConfig(max_new_tokens=max_new_tokens)
    print(f"{sm.source} · {mode.label(sm.num_layers)} · greedy · {max_new_tokens} tokens · {rounds} rounds")
    ask_results: list = []
    with tempfile.TemporaryDirectory() as tmp:
        app_results = asyncio.run(app_runs(sm, mode, sampling, rounds, ask_results, Path(tmp)))
    ask_tps = statistics.median(r[0] for r in ask_results)
    app_tps = statistics.median(r[0] for r in app_results)
    print(f"median: ask {ask_tps:.2f} tok/s, app {app_tps:.2f} tok/s")
    print(f"ratio app/ask: {app_tps / ask_tps:.3f}")


if __name__ == "__main__":
    typer.run(main)
