"""Throughput inside the chat app against `sortedchat ask`, same model, prompt, mode and token budget.

All runs share this process and one loaded model. `ask` is the command's own loop (a fresh
`ChatSession`, every event printed by its `AnswerPrinter` to a terminal console whose output is
discarded), timed twice: on the main thread, as the command runs it, and on a worker thread, as the
app runs its generation. The app is the real `SortedChatApp`, headless through Textual's test driver:
the prompt is typed and sent, the generation thread saves every token to SQLite, and the UI drains
the events into the screen at up to 30 Hz while the model runs. Every run starts a new chat, so none
reuses a cached prompt. Every round runs all three, in a shuffled order (seeded), so a noisy
neighbour and any position effect hit all of them alike; round 0 is a warm-up and not counted. Figures are the
engine's decode tokens/s (prefill excluded), medians over the rounds.

The ratio that measures the app's own cost is app / ask-on-a-worker-thread: same thread layout, the
only difference is the UI. It is printed last. (On a busy 2-core machine, torch's two intra-op threads
make the main-thread loop much slower than the same loop on a worker thread, so app / ask-on-main can
be far above 1; it is printed too.)

    python benchmarks/app_vs_ask.py                      # default model, 128 tokens, greedy, full depth
    python benchmarks/app_vs_ask.py --depth 15 --rounds 5 --model path/to/checkpoint
"""

from __future__ import annotations

import asyncio
import io
import random
import statistics
import tempfile
import threading
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


def ask_run(sm, mode: Mode, sampling: SamplingConfig) -> float:
    """`sortedchat ask`'s loop; returns decode tokens/s."""
    session = ChatSession(sm, mode)
    printer = AnswerPrinter(sm.num_layers, sm.exits[0], console=Console(file=io.StringIO(), force_terminal=True))
    for ev in session.generate([{"role": "user", "content": PROMPT}], sampling):
        printer.token(ev)
    printer.summary(session.last_stats)
    return session.last_stats.tokens_per_second


def ask_on_thread(sm, mode: Mode, sampling: SamplingConfig) -> float:
    out: list[float] = []
    worker = threading.Thread(target=lambda: out.append(ask_run(sm, mode, sampling)))
    worker.start()
    worker.join()
    return out[0]


async def app_run(app: SortedChatApp, pilot) -> float:
    chat = app.get_screen("chat")
    await chat.action_new_chat()
    chat.prompt.text = PROMPT
    await pilot.press("enter")
    while chat.dialogue.generating or chat.dialogue.stats is None:
        await pilot.pause(0.1)
    return chat.dialogue.stats.tokens_per_second


async def rounds_of_all(sm, mode: Mode, sampling: SamplingConfig, rounds: int, workdir: Path) -> dict[str, list]:
    settings = Settings(temperature=sampling.temperature, max_new_tokens=sampling.max_new_tokens)
    app = SortedChatApp(model=sm, initial_mode=lambda _: mode, settings=settings,
                        store=ChatStore(workdir / "chats.sqlite3"), export_dir=workdir)
    results: dict[str, list] = {"ask (main thread)": [], "ask (worker thread)": [], "app": []}
    async with app.run_test(size=(120, 40)) as pilot:
        order = random.Random(0)
        for round_no in range(rounds + 1):
            for name in order.sample(list(results), len(results)):
                if name == "app":
                    results[name].append(await app_run(app, pilot))
                else:
                    run = ask_run if name == "ask (main thread)" else ask_on_thread
                    results[name].append(run(sm, mode, sampling))
            name = f"round {round_no}" if round_no else "warm-up"
            print(f"  {name}: " + "   ".join(f"{k} {v[-1]:6.2f}" for k, v in results.items()) + " tok/s", flush=True)
    return {k: v[1:] for k, v in results.items()}


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
    with tempfile.TemporaryDirectory() as tmp:
        results = asyncio.run(rounds_of_all(sm, mode, sampling, rounds, Path(tmp)))
    medians = {k: statistics.median(v) for k, v in results.items()}
    print("median tok/s: " + ", ".join(f"{k} {v:.2f}" for k, v in medians.items()))
    print(f"ratio app / ask (main thread): {medians['app'] / medians['ask (main thread)']:.3f}")
    print(f"ratio app / ask (worker thread): {medians['app'] / medians['ask (worker thread)']:.3f}")


if __name__ == "__main__":
    typer.run(main)
