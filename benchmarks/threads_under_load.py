"""Full-depth decoding with 1 thread, 2 threads spinning (OpenMP's default), 2 threads waiting passively and 2
threads spinning 30000 rounds before they sleep (what the command line sets), each in a fresh process (the wait
policy is read when torch loads), on a quiet machine and beside busy processes (`--busy N` spinning Python
processes), rounds alternating.

    python benchmarks/threads_under_load.py                 # quiet, then beside 2 busy processes; 2 rounds
    python benchmarks/threads_under_load.py --busy 4 --tokens 64 --rounds 3
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
from typing import Annotated

import typer

CHILD = """
import sys, torch
torch.set_num_threads(int(sys.argv[1]))
from sortedchat.engine import ChatSession, Mode, SamplingConfig
from sortedchat.loading import LoadOptions, load_sorted_model
sm = load_sorted_model(None, LoadOptions(device="cpu", dtype="float32"))
session = ChatSession(sm, Mode.fixed())
messages = [{"role": "user", "content": "Why is the sky blue?"}]
sampling = SamplingConfig(max_new_tokens=int(sys.argv[2]), stop_at_end_of_turn=False)
list(session.generate(messages, sampling))  # warm-up
speeds = []
for _ in range(2):
    session.reset()
    list(session.generate(messages, sampling))
    speeds.append(session.last_stats.tokens_per_second)
print(max(speeds))
"""
WAYS = {"1 thread": ("1", {}), "2 threads, spinning": ("2", {"OMP_WAIT_POLICY": "ACTIVE"}),
        "2 threads, passive": ("2", {"OMP_WAIT_POLICY": "PASSIVE"}),
        "2 threads, spin 30000": ("2", {"GOMP_SPINCOUNT": "30000"})}


def speed(threads: str, env: dict, tokens: int) -> float:
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    out = subprocess.run([sys.executable, "-c", CHILD, threads, str(tokens)], env=clean | env, capture_output=True,
                         text=True, check=True).stdout
    return float(out.strip().splitlines()[-1])


def main(
    busy: Annotated[int, typer.Option("--busy", help="Spinning processes beside the loaded runs")] = 2,
    tokens: Annotated[int, typer.Option("--tokens", "-n")] = 32,
    rounds: Annotated[int, typer.Option("--rounds")] = 2,
) -> None:
    for label, n_busy in (("quiet", 0), (f"beside {busy} busy processes", busy)):
        spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n_busy)]
        try:
            results = {way: [] for way in WAYS}
            for _ in range(rounds):
                for way, (threads, env) in WAYS.items():
                    results[way].append(speed(threads, env, tokens))
        finally:
            for p in spinners:
                p.kill()
                p.wait()
        load = " ".join(f"{x:.2f}" for x in os.getloadavg())
        print(f"{label} (load {load}): " + ", ".join(f"{way} {statistics.median(v):.1f} tok/s"
                                                     for way, v in results.items()))


if __name__ == "__main__":
    typer.run(main)
