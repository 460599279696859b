"""Where a decoding step's time goes, end to end: torch.profiler over whole answers at full depth, every part
of a step labelled, and the time of each part per decoded token.

The parts are labelled by wrapping, for the profiled run only, the functions that do them (nothing in the
package carries profiling code):
- products: every `F.linear` inside a decoder layer (the layers' weight matrices), or `--quantize`'s products;
- attention: `F.scaled_dot_product_attention`;
- norms and rotary: the model's RMSNorm modules, its rotary table, `apply_rotary_pos_emb`;
- K/V writes: the cache layer's `update`;
- compiled layers: with `--compile`, the compiled library's calls (a whole layer each: its products, norms,
  rotary, K/V write and attention, none of them seen apart);
- layer glue: the decoder layer's own code around those (transformers' modules, or the engine's step):
  residual adds, the activation, reshapes, their Python;
- engine: `LayeredState.run` itself (embedding, positions, masks, the backlog, its Python);
- head (norm, lens, the LM head's product and screen), sampling, detokenizing (`IncrementalText.push`),
  events (`TokenEvent`s and the stats);
- loop: what remains of a step (the generation loop, the generator hand-over, the mode read).
The prompt's prefill is labelled and left out. Each part's time is its own (time in a part nested inside it
goes to the inner part; everything inside the head is the head's); "ops" is the share of it spent inside
torch operators, the rest is Python. Profiling slows Python and small operators down, so the unprofiled
ms per token of the same answers is printed beside it.

Both ways of running the layers are profiled in the same process: the engine's own steps
(`engine/layer_step.py`) and transformers' layers (the reference), their unprofiled answers alternating.

    python benchmarks/profile_step.py                       # default model, float32, 1 thread, 3 x 64 tokens
    python benchmarks/profile_step.py --threads 2 --tokens 128 --rounds 5
    python benchmarks/profile_step.py --quantize int4               # the layers' products in 4-bit blocks
    python benchmarks/profile_step.py --quantize int4 --compile     # the engine's steps compiled (`--compile`)
"""

from __future__ import annotations

import contextlib
import functools
import os
import statistics
import sys
import time
from collections import defaultdict
from typing import Annotated, Optional

import torch
import typer
from rich.console import Console
from rich.table import Table
from torch.profiler import ProfilerActivity, profile, record_function

from sortedchat.engine import ChatSession, Mode, SamplingConfig, compiled, layer_step
from sortedchat.engine import session as session_module
from sortedchat.engine import state as state_module
from sortedchat.engine.sampling import Sampler
from sortedchat.engine.text import IncrementalText
from sortedchat.int4 import Int4Linear, JoinedInt4
from sortedchat.loading import LoadOptions, load_sorted_model
from sortedchat.quantize import Int8Linear
from sortedchat.sorted_model import SortedModel

PROMPT = "Why is the sky blue?"
PARTS = ("products", "compiled layers", "attention", "norms", "rotary", "K/V writes", "layer glue", "engine", "head",
         "sampling", "detokenizing", "events", "loop")
ABSORBING = ("head", "sampling", "prefill")  # everything inside these is theirs


def targets(sm: SortedModel) -> list[tuple[object, str, str]]:
    """(owner, attribute, part) of every function the profiled run wraps; those this model lacks are skipped."""
    layer = sm.layers[0]
    modeling = sys.modules[type(layer.self_attn).__module__]
    cache_layer = type(ChatSession(sm).state.cache.layers[0])
    found = [  # wrapped before a session (re)builds its layer steps, which bind some of these
        (torch.nn.functional, "linear", "products"),
        (Int8Linear, "forward", "products"),  # `--quantize`'s products
        (Int4Linear, "forward", "products"),
        (JoinedInt4, "__call__", "products"),
        (torch.nn.functional, "scaled_dot_product_attention", "attention"),
        (type(layer.input_layernorm), "forward", "norms"),
        (type(sm.model.model.rotary_emb), "forward", "rotary"),
        (modeling, "apply_rotary_pos_emb", "rotary"),
        (cache_layer, "update", "K/V writes"),
        (type(layer), "forward", "layer glue"),
        (type(layer.self_attn), "forward", "layer glue"),
        (type(layer.mlp), "forward", "layer glue"),
        (state_module.LayeredState, "run", "engine"),
        (SortedModel, "head", "head"),
        (Sampler, "pick", "sampling"),
        (IncrementalText, "push", "detokenizing"),
        (session_module._Answer, "event", "events"),
        (ChatSession, "_prefill", "prefill"),
        (layer_step.LayerStep, "__call__", "layer glue"),
        (compiled.CompiledStep, "__call__", "layer glue"),
        (compiled.DecodeGraph, "run", "compiled layers"),  # `--compile`'s library: a layer in one call
        (layer_step, "attend", "attention"),
    ]
    return [(owner, attr, part) for owner, attr, part in found if hasattr(owner, attr)]


@contextlib.contextmanager
def labelled(wrapped: list[tuple[object, str, str]]):
    """Each target wrapped in a `record_function` named after its part, for the time inside."""
    saved = []
    for owner, attr, part in wrapped:
        original = getattr(owner, attr)

        def wrapper(*args, _fn=original, _part=part, **kwargs):
            with record_function(f"part:{_part}"):
                return _fn(*args, **kwargs)

        saved.append((owner, attr, original if attr in vars(owner) else None))
        setattr(owner, attr, functools.wraps(original)(wrapper))
    try:
        yield
    finally:
        for owner, attr, original in reversed(saved):
            if original is None:  # it was inherited
                delattr(owner, attr)
            else:
                setattr(owner, attr, original)


def part_of(event) -> str | None:
    return event.name[5:] if event.name.startswith("part:") else None


def breakdown(events) -> tuple[dict[str, float], dict[str, float]]:
    """Per part, its own microseconds and how many of them were inside torch operators. A labelled event's own
    time is its duration less its nearest labelled descendants'; it goes to its outermost absorbing part if it
    has one, else to its own. An operator counts once, at the outermost one under a label (or under none: the
    loop's)."""
    own, ops = defaultdict(float), defaultdict(float)
    for ev in events:
        chain = []
        parent = ev.cpu_parent
        while parent is not None:
            chain.append(parent)
            parent = parent.cpu_parent
        parts = [part_of(p) for p in [ev, *chain] if part_of(p)]
        owner = next((p for p in reversed(parts) if p in ABSORBING), parts[0] if parts else "loop")
        if part_of(ev):
            own[owner] += ev.time_range.elapsed_us() - sum(c.time_range.elapsed_us() for c in labelled_children(ev))
        elif not chain or part_of(chain[0]):
            ops[owner] += ev.time_range.elapsed_us()
    return dict(own), dict(ops)


def labelled_children(event):
    """The nearest labelled events below `event` (through unlabelled operators)."""
    for child in event.cpu_children:
        if part_of(child):
            yield child
        else:
            yield from labelled_children(child)


def answer(session: ChatSession, sampling: SamplingConfig) -> tuple[int, float]:
    session.reset()
    start = time.perf_counter()
    n = sum(1 for _ in session.generate([{"role": "user", "content": PROMPT}], sampling))
    return n, time.perf_counter() - start


@contextlib.contextmanager
def through_transformers(on: bool):
    """While inside (with `on`), sessions call every decoder layer through transformers: the reference path."""
    if not on:
        yield
        return
    original, probed = state_module.own_step_matches, dict(state_module._MATCHES)
    state_module._MATCHES.clear()
    state_module.own_step_matches = lambda *args: False
    try:
        yield
    finally:
        state_module.own_step_matches = original
        state_module._MATCHES.clear()
        state_module._MATCHES.update(probed)  # the engine's path is not probed again


def profiled(session: ChatSession, sampling: SamplingConfig, wrapped) -> tuple[dict[str, float], dict[str, float]]:
    """Per part, microseconds per token of its own time and of the operators in it, over one profiled answer."""
    with labelled(wrapped), profile(activities=[ProfilerActivity.CPU]) as prof:
        n, seconds = answer(session, sampling)
    own, ops = breakdown(prof.events())
    total = seconds * 1e6 - own.pop("prefill", 0.0)
    own["loop"] = total - sum(own.values())
    # the prefill stops before the prompt's last token: one decode step per answer token
    return {k: v / n for k, v in own.items()}, {k: v / n for k, v in ops.items()}


def main(
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Model [default: the shipped default]")] = None,
    tokens: Annotated[int, typer.Option("--tokens", "-n", help="Tokens per answer")] = 64,
    rounds: Annotated[int, typer.Option("--rounds", help="Unprofiled answers timed per path (median)")] = 3,
    threads: Annotated[int, typer.Option("--threads", help="torch threads")] = 1,
    quantize: Annotated[Optional[str], typer.Option("--quantize", help="int8 or int4 products")] = None,
    compile: Annotated[bool, typer.Option("--compile", help="the engine's steps compiled (`--compile`)")] = False,
) -> None:
    """Profile full-depth decoding through the engine's own layer steps and through transformers' layers."""
    torch.set_num_threads(threads)
    sm = load_sorted_model(model, LoadOptions(device="cpu", dtype="float32", quantize=quantize, compile=compile))
    if compile and (problem := compiled.compile_steps(sm)):
        raise SystemExit(problem)
    sampling = SamplingConfig(max_new_tokens=tokens, stop_at_end_of_turn=False)
    paths = {"transformers' layers": True, "engine's steps": False}
    sessions = {}
    for name, reference in paths.items():
        with through_transformers(reference):
            sessions[name] = ChatSession(sm, Mode.fixed())
            answer(sessions[name], sampling)  # warm-up
    clocks = {name: {"wall": [], "cpu": []} for name in paths}
    for _ in range(rounds):  # alternating, so load that comes and goes hits both
        for name, reference in paths.items():
            with through_transformers(reference):
                cpu = time.process_time()
                answer(sessions[name], sampling)
                stats = sessions[name].last_stats
                clocks[name]["wall"].append(stats.decode_seconds / stats.tokens)
                clocks[name]["cpu"].append((time.process_time() - cpu) / stats.tokens)  # the prompt included
    results = {}
    for name, reference in paths.items():
        with through_transformers(reference):
            results[name] = profiled(sessions[name], sampling, targets(sm))

    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    weights = (f"float32, {quantize} products" if quantize else "float32") + (", --compile" if compile else "")
    table = Table(title=f"{sm.source} · {weights} · {torch.get_num_threads()} thread(s) · {tokens} tokens · ms per "
                        f"token (profiled: ops / Python) · load {load}", title_justify="left")
    table.add_column("part")
    for name in paths:
        table.add_column(name, justify="right")
    for part in PARTS:
        cells = []
        for name in paths:
            own, ops = results[name]
            us, inside = own.get(part, 0.0), ops.get(part, 0.0)
            cells.append(f"{us / 1e3:.2f} ({inside / 1e3:.2f} / {(us - inside) / 1e3:.2f})")
        table.add_row(part, *cells)
    table.add_row("total, profiled", *(f"{sum(results[n][0].values()) / 1e3:.2f}" for n in paths))
    for clock, what in (("wall", "decoding"), ("cpu", "whole answer, CPU clock")):
        table.add_row(f"total, unprofiled ({what}, median of {rounds})",
                      *(f"{statistics.median(clocks[n][clock]) * 1e3:.2f}" for n in paths))
    Console().print(table)
    for clock in ("wall", "cpu"):
        base, ours = (statistics.median(clocks[n][clock]) for n in paths)
        print(f"engine's steps / transformers' layers, ms per token ({clock} clock): {ours / base:.2f}")


if __name__ == "__main__":
    typer.run(main)
