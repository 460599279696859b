"""The engine's kernels against the plain routes they replace, in one process, as ratios.

- LM head on one position: `F.linear` (what `lm_head` does) against the column-major float32 copy and the
  screen of `HeadProduct` chosen on this machine (greedy steps: half-precision or int8 estimates, the candidates for
  the argmax recomputed in float32);
- LM head on a few positions (speculative verification): `F.linear` against `weight @ hidden.T`;
- every layer's float32 products on one position, weights streamed from memory as in a token: `F.linear` (the
  BLAS call the eager step makes) against the reduction `--compile`'s graph writes instead (`compiled.linear`,
  here compiled by `torch.compile`, a layer's products in one call);
- the decoder stack on n positions against one position: what draining a backlog of n-1 positions costs
  (the reason auto mode and drafting gain little on a CPU);
- one decode step's K/V update: transformers' `DynamicLayer` (a copy of the whole cache) against
  `GrowingLayer` (written in place), at a context of `--context` positions.

Every figure is the median of `--rounds` rounds; the rounds of the two sides of each ratio alternate.

    python benchmarks/engine_kernels.py                   # the default model, float32, CPU
    python benchmarks/engine_kernels.py --model path/to/checkpoint --rounds 15
"""

from __future__ import annotations

import statistics
import time
from typing import Annotated, Optional

import torch
import torch.nn.functional as F
import typer
from rich.console import Console
from rich.table import Table
from transformers.cache_utils import DynamicLayer

from sortedchat.engine import compiled
from sortedchat.engine.state import LayeredState
from sortedchat.hf_contract import GrowingLayer
from sortedchat.loading import LoadOptions, load_sorted_model
from sortedchat.quantize import PROJECTIONS


def timed(fn, inner: int) -> float:
    t = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - t) / inner


def compare(base, other, rounds: int, inner: int) -> tuple[float, float]:
    """Median seconds of `base` and `other`, their rounds alternating."""
    base(), other()  # warm-up (and the head copies are made here)
    a, b = [], []
    for _ in range(rounds):
        a.append(timed(base, inner))
        b.append(timed(other, inner))
    return statistics.median(a), statistics.median(b)


def main(
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Model [default: the shipped default]")] = None,
    context: Annotated[int, typer.Option("--context", help="Positions already in the cache")] = 250,
    rounds: Annotated[int, typer.Option("--rounds", help="Timed rounds per figure")] = 9,
) -> None:
    sm = load_sorted_model(model, LoadOptions(device="cpu", dtype="float32"))
    L, H = sm.num_layers, sm.model.config.hidden_size
    w = sm.model.lm_head.weight
    g = torch.Generator().manual_seed(0)
    rows = []
    with torch.inference_mode():
        state = LayeredState(sm)
        ids = torch.randint(0, w.shape[0], (context + 8,), generator=g).tolist()
        state.run(L, ids[:context])
        h = sm.model.model.norm(state.run(L, ids[context : context + 1]))
        state.crop(context)
        base, new = compare(lambda: F.linear(h, w), lambda: sm.head_product(h), rounds, 10)
        rows.append(("head, 1 position", "F.linear", base, "column-major copy", new))
        base, new = compare(lambda: F.linear(h, w), lambda: sm.head_product.screened(h), rounds, 10)
        chosen = sm.head_product.screen(h)
        rows.append(("head, 1 position, greedy", "F.linear", base,
                     f"screen chosen here ({chosen.name if chosen else 'none'}) + float32 candidates", new))
        for n in (2, 4, 8):
            hn = torch.randn(1, n, H, generator=g) * float(h.norm() / H**0.5)
            base, new = compare(lambda: F.linear(hn, w), lambda: sm.head_product(hn), rounds, 5)
            rows.append((f"head, {n} positions", "F.linear", base, "weight @ hidden.T", new))

        weights = [[layer.get_submodule(path).weight for path in PROJECTIONS] for layer in sm.layers]
        inputs = [torch.randn(1, w.shape[1], generator=g) for w in weights[0]]
        reduction = torch.compile(lambda xs, ws: [compiled.linear(x, w, None, None) for x, w in zip(xs, ws)])
        base, new = compare(lambda: [F.linear(x, w) for ws in weights for x, w in zip(inputs, ws)],
                            lambda: [reduction(inputs, ws) for ws in weights], rounds, 2)
        rows.append((f"{L} layers' products, 1 position", "F.linear", base, "reduction (--compile's)", new))

        def stack(n):
            def run():
                state.run(L, ids[context : context + n])
                state.crop(context)

            return run

        for n in (2, 4, 8):
            base, new = compare(stack(1), stack(n), rounds, 2)
            rows.append((f"{L} layers, {n} positions", "1 position", base, f"{n} positions", new))

        kv = [(torch.randn(1, 3, context, 64), torch.randn(1, 3, context, 64))]
        step = (torch.randn(1, 3, 1, 64), torch.randn(1, 3, 1, 64))

        def cache_step(kind):
            layer = kind()
            layer.update(*kv[0])

            def run():
                layer.update(*step)
                layer.crop(-1)

            return run

        base, new = compare(cache_step(DynamicLayer), cache_step(GrowingLayer), rounds, 200)
        rows.append((f"K/V update, context {context}", "DynamicLayer (cat)", base, "GrowingLayer (in place)", new))

    table = Table(title=f"{sm.source} · float32 · CPU, {torch.get_num_threads()} threads · median of {rounds} rounds",
                  title_justify="left")
    for col in ("what", "baseline", "ms", "ours", "ms", "ours / baseline"):
        table.add_column(col, justify="left" if col in ("what", "baseline", "ours") else "right")
    for what, a_name, a, b_name, b in rows:
        table.add_row(what, a_name, f"{a * 1e3:.3f}", b_name, f"{b * 1e3:.3f}", f"{b / a:.2f}")
    console = Console()
    console.width = max(console.width, 110)
    console.print(table)


if __name__ == "__main__":
    typer.run(main)
