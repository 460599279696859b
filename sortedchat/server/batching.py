"""Batched decode steps: the steps of concurrent requests share the weight reads.

On a CPU a decoding step reads every weight of the layers it runs for a few positions; several requests'
positions in one call read them once. Each request's step runs on its `Fiber` with a `BatchRunner` as its session's
`StepRunner`, so its layer passes become requests (`LayersAsk`) that the engine thread answers for every fiber at
once (`run_together`). Whatever the modes, the passes ride together layer by layer: the lowest layer that some pass
needs next runs once for all the passes that need it. So a fixed-depth token at 21 and one at 30 share layers
1..21; auto-mode tokens all run to the first exit together, each checks its own confidence (its own threshold) in
its fiber, and those that go on ride together to the next exit; speculative drafts share their passes, and a
verification (the last draft draining the drafted positions through the layers above the draft depth) shares
those layers with whatever else runs there.

A batched layer is the engine's own `LayerStep` over the requests' positions side by side (`LayerStep.rows`):
norms, projections and the MLP once over all rows, rotary, K/V and attention per request, each over its own
cache, exactly as a single step does (BENCHMARKS.md has what a batch costs against single steps). A layer called
through transformers runs per request.

The head is not batched: one greedy row goes through the head's half-precision screen, and four such cost less
than one float32 product over four rows (BENCHMARKS.md). A product over several rows sums in another order than
over one row, so where two tokens are within rounding of each other a batched answer can differ from the same
request served alone (greedy answers are otherwise the same).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sortedchat.engine.layer_step import LayerStep, Span
from sortedchat.engine.session import StepRunner
from sortedchat.engine.state import LayeredState, LayerPass
from sortedchat.server.fibers import Fiber


@dataclass(frozen=True)
class LayersAsk:
    """`state.run(depth, new_ids)`, to be run with the other fibers' passes."""

    state: LayeredState
    depth: int
    new_ids: list[int] | None


class BatchRunner(StepRunner):
    """A session's runner in the server: while its step runs on a fiber (`fiber` set), the layers are asked of the
    engine thread; otherwise (the only request stepping) they run at once, as a session's own do."""

    def __init__(self):
        self.fiber: Fiber | None = None

    def layers(self, state, depth, new_ids=None):
        if self.fiber is None:
            return super().layers(state, depth, new_ids)
        return self.fiber.ask(LayersAsk(state, depth, new_ids))


@torch.inference_mode()
def run_together(asks: list[LayersAsk]) -> tuple[list, list[bool]]:
    """Every ask's pass, and whether it shared a layer call with another. A failure answers every ask with the
    exception (their states are part-way through a step: those requests end)."""
    shared = [False] * len(asks)
    spans, rotation = [], None  # the spans of the last batched layer, and their `rotation_of`
    try:
        passes = [LayerPass(ask.state, ask.depth, ask.new_ids) for ask in asks]  # each starts its state's step
        calls = [p.next_call() for p in passes]
        while live := [b for b, call in enumerate(calls) if call is not None]:
            i = min(calls[b][0] for b in live)
            group = [b for b in live if calls[b][0] == i]
            steps = [passes[b].state.steps[i] for b in group]
            items = [(calls[b][1], calls[b][2], passes[b].state.cache.layers[i]) for b in group]
            if len(group) > 1 and all(isinstance(step, LayerStep) for step in steps):
                if len(spans) != len(items) or any(a is not b for a, b in zip(spans, (span for _, span, _ in items))):
                    spans = [span for _, span, _ in items]  # (a pass keeps its span while its positions stay)
                    rotation = rotation_of(spans)
                outs = steps[0].rows(items, rotation)
                for b in group:
                    shared[b] = True
            else:
                outs = [step(*item) for step, item in zip(steps, items)]
            for b, out in zip(group, outs):
                passes[b].done(out)
                calls[b] = passes[b].next_call()
        return [p.finish() for p in passes], shared
    except Exception as exc:  # noqa: BLE001 - handed to each request, which ends
        return [batch_failure(exc) for _ in asks], shared


def batch_failure(exc: Exception) -> RuntimeError:
    """An error of its own for each request of a failed batched step (one exception raised on several fibers would
    gather all their frames), caused by `exc`."""
    error = RuntimeError(f"a batched step failed ({type(exc).__name__}: {exc})")
    error.__cause__ = exc
    return error


def rotation_of(spans: list[Span]) -> tuple[torch.Tensor, torch.Tensor]:
    """The rotary factors (`Span.rotation`) of several requests' positions side by side, [1, 1, sum q, head_dim]."""
    factors = [span.rotation() for span in spans]
    return torch.cat([cos for cos, _ in factors], dim=2), torch.cat([sin for _, sin in factors], dim=2)

