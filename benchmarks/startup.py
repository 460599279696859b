"""How long `sortedchat --help` takes to start, against a bare `python -c pass` in the same process.

The command imports torch and transformers only inside the commands that need them, so its help (and
the parsing of every option) should cost little more than starting Python. Each round runs both, in
alternating order, as fresh subprocesses of this interpreter; the figures are medians over the
rounds, and the ratio of the medians is printed last (a busy machine slows both alike).

    python benchmarks/startup.py                 # 7 rounds of `sortedchat --help`
    python benchmarks/startup.py --rounds 15 --args "ask --help"
"""

from __future__ import annotations

import shlex
import statistics
import subprocess
import sys
import time
from typing import Annotated

import typer


def wall(argv: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main(
    rounds: Annotated[int, typer.Option("--rounds", help="Timed runs of each (after one warm-up)")] = 7,
    args: Annotated[str, typer.Option("--args", help="Arguments after `sortedchat`")] = "--help",
) -> None:
    command = [sys.executable, "-m", "sortedchat", *shlex.split(args)]
    baseline = [sys.executable, "-c", "pass"]
    wall(command), wall(baseline)  # warm the file cache
    times: dict[str, list[float]] = {"sortedchat": [], "python": []}
    for i in range(rounds):
        pair = [("sortedchat", command), ("python", baseline)]
        for name, argv in pair if i % 2 == 0 else reversed(pair):
            times[name].append(wall(argv))
    ours, bare = statistics.median(times["sortedchat"]), statistics.median(times["python"])
    print(f"sortedchat {args}: {ours:.3f} s (median of {rounds})")
    print(f"python -c pass: {bare:.3f} s")
    print(f"ratio: {ours / bare:.1f}x python's own start")


if __name__ == "__main__":
    typer.run(main)
