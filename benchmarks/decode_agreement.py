"""Teacher-forced agreement of a quantized (and compiled) model's decoding path with float32 full depth.

`sortedchat eval --quantize` measures agreement with float32 on whole sequences, which run through transformers'
forward; a decoded token runs through the engine's one-position step instead (the compiled library with
`--compile`), whose roundings differ. Here both run through `ChatSession`, one position at a time, teacher-forced on
each held-out record's own response: at every response token, whether the quantized model's greedy choice is the
float32 model's. Variants in one process: quantized eager, and quantized compiled where `--compile` is given.

    python benchmarks/decode_agreement.py --quantize int4 --compile            # last 200 alpaca records, 40 of them
    python benchmarks/decode_agreement.py --quantize int4 --compile --limit 0  # all 200
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Annotated

import torch
import typer

from sortedchat.engine import ChatSession, SamplingConfig
from sortedchat.engine.compiled import compile_steps
from sortedchat.loading import LoadOptions, load_sorted_model
from sortedchat.quantize import quantize_model
from sortedchat.training.data import last_records, load_records
from sortedchat.training.evaluate import model_template
from sortedchat.training.templates import IGNORE, encode_all

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "alpaca_1800.json"


def forced_choices(sm, records: list[tuple[list[int], list[int]]]) -> list[int]:
    """The greedy full-depth choice at every response token, each step fed the record's own token."""
    greedy = SamplingConfig(temperature=0.0, max_new_tokens=1)
    chosen = []
    for prompt, response in records:
        session = ChatSession(sm)
        session.stop_ids = set()
        chosen += [ev.token_id for ev in session.generate_ids(prompt, greedy, forced=response)]
    return chosen


def main(
    quantize: Annotated[str, typer.Option(help="int8 or int4")] = "int4",
    compile: Annotated[bool, typer.Option("--compile", help="also the compiled step")] = False,
    data: Annotated[Path, typer.Option(help="Alpaca/chat records")] = DATA,
    holdout: Annotated[int, typer.Option(help="the last N records (what training left out)")] = 200,
    limit: Annotated[int, typer.Option(help="at most this many of them (0: all)")] = 40,
    max_length: Annotated[int, typer.Option(help="tokens per record, prompt included")] = 512,
    threads: Annotated[int, typer.Option(help="torch threads")] = 1,
) -> None:
    torch.set_num_threads(threads)
    reference = load_sorted_model(None, LoadOptions(device="cpu", dtype="float32", unmerged=quantize == "int4"))
    examples = last_records(load_records(str(data)).examples, holdout, limit, str(data))
    encoded, _ = encode_all(examples, reference.tokenizer, model_template(reference, None), max_length)
    records = []
    for e in encoded:
        first = next(i for i, label in enumerate(e.labels) if label != IGNORE)
        records.append((e.input_ids[:first], [t for t in e.labels[first:] if t != IGNORE]))
    start = time.perf_counter()
    expected = forced_choices(reference, records)
    print(f"{len(records)} records, {len(expected)} response tokens; float32 in {time.perf_counter() - start:.0f} s")
    quantized = copy.deepcopy(reference)
    quantize_model(quantized, quantize)
    variants = {f"{quantize}, eager": quantized}
    if compile:
        variants[f"{quantize}, --compile"] = compiled = copy.deepcopy(quantized)
        problem = compile_steps(compiled)
        if problem:
            print(problem)
    for name, sm in variants.items():
        start = time.perf_counter()
        got = forced_choices(sm, records)
        same = sum(a == b for a, b in zip(got, expected))
        print(f"{name}: {same}/{len(expected)} = {same / len(expected):.1%} of float32 full depth's choices "
              f"({time.perf_counter() - start:.0f} s, {threads} thread{'s' if threads > 1 else ''})")


if __name__ == "__main__":
    typer.run(main)
