"""`--compile` against the eager engine, in one process: ms per decoded token at full depth (greedy), the two
alternating prompt by prompt on two copies of the same model, at each thread count; whether their tokens are the
same; and how long `compile_steps` took (run it twice: the second process finds inductor's on-disk cache; a fresh
`TORCHINDUCTOR_CACHE_DIR` makes the first run cold).

    python benchmarks/compiled_step.py                                   # default model, threads 1 and 2
    python benchmarks/compiled_step.py --quantize int4                   # both models --quantize int4
    TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) python benchmarks/compiled_step.py --threads 1   # a cold compile

Wall time is what a user waits; CPU time of the decoding thread (1 thread only) is what the step costs when
other processes share the cores.
"""

from __future__ import annotations

import copy
import statistics
import time
from pathlib import Path
from typing import Annotated

import torch
import typer

from sortedchat.engine import ChatSession, SamplingConfig
from sortedchat.engine.compiled import compile_steps
from sortedchat.loading import LoadOptions, load_sorted_model

PROMPTS = Path(__file__).with_name("prompts3.txt")


def answer(sm, prompt: str, tokens: int) -> tuple[list[int], float, float]:
    """The greedy answer's tokens and its decoding's wall and thread CPU ms per token (prefill left out)."""
    session = ChatSession(sm)
    session.stop_ids = set()  # every answer runs to `tokens`
    out = []
    stream = session.generate([{"role": "user", "content": prompt}], SamplingConfig(max_new_tokens=tokens))
    first = next(stream)  # the prompt's pass and the first token
    out.append(first.token_id)
    w, c = time.perf_counter(), time.thread_time()
    out.extend(event.token_id for event in stream)
    wall, cpu = time.perf_counter() - w, time.thread_time() - c
    return out, 1000 * wall / (len(out) - 1), 1000 * cpu / (len(out) - 1)


def main(
    threads: Annotated[str, typer.Option(help="thread counts, comma-separated")] = "1,2",
    tokens: Annotated[int, typer.Option(help="tokens per answer")] = 64,
    rounds: Annotated[int, typer.Option(help="times each prompt is answered by each")] = 2,
    prompts: Annotated[Path, typer.Option(help="one prompt a line, # comments")] = PROMPTS,
    quantize: Annotated[str | None, typer.Option(help="int8 or int4: both models quantized so")] = None,
) -> None:
    texts = [line for line in prompts.read_text().splitlines() if line.strip() and not line.startswith("#")]
    eager = load_sorted_model(None, LoadOptions(device="cpu", dtype="float32", quantize=quantize,
                                                compile=quantize == "int8"))  # int8: the graph's grouped weights
    fused = copy.deepcopy(eager)
    start = time.perf_counter()
    problem = compile_steps(fused)
    print(f"compile_steps: {time.perf_counter() - start:.1f} s{'' if problem is None else ': ' + problem}")
    for count in (int(t) for t in threads.split(",")):
        torch.set_num_threads(count)
        for sm in (eager, fused):  # warm both at this thread count
            answer(sm, texts[0], 8)
        ms = {"eager": ([], []), "compiled": ([], [])}
        same = []
        for _ in range(rounds):
            for text in texts:
                reference, *times = answer(eager, text, tokens)
                for i, t in enumerate(times):
                    ms["eager"][i].append(t)
                got, *times = answer(fused, text, tokens)
                for i, t in enumerate(times):
                    ms["compiled"][i].append(t)
                same.append(got == reference)
        wall = {k: statistics.median(v[0]) for k, v in ms.items()}
        cpu = {k: statistics.median(v[1]) for k, v in ms.items()}
        print(f"{count} thread(s), {len(texts)} prompts x {tokens} tokens x {rounds} rounds, medians: "
              f"wall eager {wall['eager']:.1f} ms/token, compiled {wall['compiled']:.1f} "
              f"({wall['eager'] / wall['compiled']:.2f}x)"
              + (f"; thread CPU eager {cpu['eager']:.1f}, compiled {cpu['compiled']:.1f} "
                 f"({cpu['eager'] / cpu['compiled']:.2f}x)" if count == 1 else "")
              + f"; same tokens in {sum(same)} of {len(same)} answers")


if __name__ == "__main__":
    typer.run(main)
