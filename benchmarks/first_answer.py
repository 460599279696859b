"""How much slower the first answer after a launch is than the second, with and without the app's warm-up.

The chat app runs a short throwaway answer behind its loading screen (`sortedchat.tui.warmup`), so the
first answer a user sees should run at the speed of the later ones. Each round starts a fresh process
per variant (the one-time costs are per process); in it the model loads, the warm-up runs or not, then
two answers to the same prompt are timed in new sessions. Printed: each variant's median ratio of the
first answer's decode speed to the second's (1.0 = no first-answer penalty), measured in the same
process, so a busy machine slows both answers alike.

    python benchmarks/first_answer.py                  # the default model, 3 rounds
    python benchmarks/first_answer.py --model DIR --rounds 5 --tokens 48
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from typing import Annotated, Optional

import typer

CHILD = """
import json, sys, time
from sortedchat.engine import ChatSession, SamplingConfig
from sortedchat.loading import load_sorted_model
from sortedchat.tui.warmup import warm_up

spec, warm, tokens = json.loads(sys.argv[1])
sm = load_sorted_model(spec)
if warm:
    warm_up(sm, None, should_stop=lambda: False)
prompt = [{"role": "user", "content": "Write a python function that adds two numbers."}]
speeds = []
for _ in range(2):
    session = ChatSession(sm)
    start = time.perf_counter()
    n = sum(1 for _ in session.generate(prompt, SamplingConfig(max_new_tokens=tokens)))
    speeds.append(n / (time.perf_counter() - start))
print(json.dumps(speeds))
"""


def answer_speeds(spec: str | None, warm: bool, tokens: int) -> list[float]:
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps([spec, warm, tokens])], check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(
    model: Annotated[Optional[str], typer.Option("--model", help="Model spec (default: the built-in model)")] = None,
    rounds: Annotated[int, typer.Option("--rounds")] = 3,
    tokens: Annotated[int, typer.Option("--tokens", help="Tokens per answer")] = 32,
) -> None:
    ratios: dict[str, list[float]] = {"no warm-up": [], "warm-up": []}
    for i in range(rounds):
        order = [("no warm-up", False), ("warm-up", True)]
        for name, warm in order if i % 2 == 0 else reversed(order):
            first, second = answer_speeds(model, warm, tokens)
            ratios[name].append(first / second)
            print(f"round {i + 1} {name}: first {first:.1f} tok/s, second {second:.1f} tok/s", flush=True)
    for name, values in ratios.items():
        print(f"{name}: first answer at {statistics.median(values):.2f}x the second's speed (median of {rounds})")


if __name__ == "__main__":
    typer.run(main)
