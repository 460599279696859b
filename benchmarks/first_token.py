"""Time to the first token of an answer to a ~100-token prompt (issue 20's "first token after Enter"): the prompt's
pass through every layer and the head, and the first token's choice, from a fresh session, in one process.

Rows: the default model in float32, `--quantize int4` (prompts on the bfloat16 copies of its 4-bit weights), the
same int4 model with its prompts through the int4 kernel (the copies' baseline), and llama.cpp on the same GGUF
(`sortedchat[peer]`, skipped without it) as the peer: ms, and x llama.cpp. Each figure is the median of
`--rounds` rounds, the rows alternating within a round; one warm-up round first (the head's screen is chosen then).

    python benchmarks/first_token.py                    # 1 and 2 threads, 7 rounds
    python benchmarks/first_token.py --threads 2 --rounds 11
"""

from __future__ import annotations

import statistics
import time
from typing import Annotated

import torch
import typer

from sortedchat import int4
from sortedchat.bench.peer import LlamaCpp, gguf_for, skip_reason
from sortedchat.engine import ChatSession, SamplingConfig
from sortedchat.engine.context import encode_chat
from sortedchat.loading import LoadOptions, load_sorted_model

PROMPT = [{"role": "user", "content": "Read this paragraph and say in one sentence what it is about. " + " ".join(
    ["The lighthouse keeper climbed the stairs every evening to light the lamp, and every morning he wrote in "
     "his log what ships had passed, what the weather had done and how the sea had looked."] * 2)}]


def first_token_ms(sm, prompt: list[int]) -> float:
    session = ChatSession(sm)
    start = time.perf_counter()
    next(iter(session.generate_ids(prompt, SamplingConfig(max_new_tokens=1))))
    return 1000 * (time.perf_counter() - start)


def main(
    threads: Annotated[str, typer.Option(help="thread counts, comma-separated")] = "1,2",
    rounds: Annotated[int, typer.Option(help="timed rounds (the median is printed)")] = 7,
) -> None:
    float32 = load_sorted_model(None, LoadOptions(device="cpu", dtype="float32"))
    quantized = load_sorted_model(None, LoadOptions(device="cpu", dtype="float32", quantize="int4"))
    limit, int4.DENSE_LIMIT = int4.DENSE_LIMIT, 0
    kernel_only = load_sorted_model(None, LoadOptions(device="cpu", dtype="float32", quantize="int4"))
    int4.DENSE_LIMIT = limit
    prompt = encode_chat(float32, PROMPT)
    rows = {"float32": lambda: first_token_ms(float32, prompt),
            "int4 (prompts on bfloat16 copies)": lambda: first_token_ms(quantized, prompt),
            "int4 (prompts through the int4 kernel)": lambda: first_token_ms(kernel_only, prompt)}
    gguf = gguf_for(None)
    reason = skip_reason(gguf)
    print(f"prompt: {len(prompt)} tokens" + (f"; llama.cpp skipped: {reason}" if reason else ""))
    for count in (int(t) for t in threads.split(",")):
        torch.set_num_threads(count)
        timed = dict(rows)
        if reason is None:
            peer = LlamaCpp(gguf, count, context=len(prompt) + 8)

            def llama_cpp() -> float:
                start = time.perf_counter()
                next(peer.tokens(prompt, 1))
                return 1000 * (time.perf_counter() - start)

            timed["llama.cpp (Q4_1 GGUF)"] = llama_cpp
        for run in timed.values():  # warm-up
            run()
        ms = {name: [] for name in timed}
        for _ in range(rounds):
            for name, run in timed.items():
                ms[name].append(run())
        peer_ms = statistics.median(ms["llama.cpp (Q4_1 GGUF)"]) if reason is None else None
        print(f"{count} thread{'s' if count > 1 else ''}, median of {rounds}:")
        for name, values in ms.items():
            median = statistics.median(values)
            ratio = f"  {median / peer_ms:.2f}x llama.cpp's time" if peer_ms else ""
            print(f"  {name:40s} {median:7.1f} ms{ratio}")


if __name__ == "__main__":
    typer.run(main)
