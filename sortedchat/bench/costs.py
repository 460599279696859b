"""What one decoding step costs, piece by piece: a decoder layer, the norm + full head, a confidence check.

The ideal speed-up of depth k is what these costs allow with no overhead at all,
(L·layer + head) / (k·layer + head); the benchmark prints it beside the achieved ratio, and calibration
uses the same costs to predict what auto mode will gain. Every cost is timed on the path the loaded model
decodes on, never assumed: the layers through the state a `ChatSession` builds (the engine's own `LayerStep`,
the compiled step or int8 products where the model was loaded so), the head as a greedy step runs it (the
screen `head_product` chose on this machine, or the plain head of a quantized model), the checks through the
measures themselves. Layer cost is measured at two depths, so it includes what the engine adds per layer; the
rest of a step (embedding, rotary tables) is `step`.

`drain` is what one more position adds to a layer call, as a share of `layer`: the cost of the backlog an
early exit leaves, which the next deeper token's pass pays (exact KV). Near 0 where batching is free (a
GPU); on a CPU it decides whether auto mode saves anything at all (0.4-0.9 on a 2-core AMD CPU, about 0.25 on
the Intel Xeon of issue 20): a token leaving at exit e saves (L - e) * layer * (1 - drain). With propagated
K/V (`kv` "propagate") nothing is drained: the token saves (L - e) * (layer - kv_fill), `kv_fill` being what
storing one position's K/V projections in one layer costs.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from sortedchat import SortedChatError
from sortedchat.bench.prompts import load_prompts
from sortedchat.engine.confidence import MEASURES, make_measure
from sortedchat.engine.modes import KV
from sortedchat.engine.session import ChatSession
from sortedchat.sorted_model import SortedModel

Timer = Callable[[Callable[[], object]], float]  # the median seconds of a call, as `measure_costs` times it


@dataclass
class Costs:
    """Seconds, for one token at a context of `context` positions."""

    layer: float
    head: float  # a greedy step's head (`SortedModel.head(..., greedy=True)`)
    step: float
    context: int
    drain: float = 0.0  # one more position in a layer call, as a share of `layer`
    kv_fill: float = 0.0  # seconds to store one position's propagated K/V in one layer
    kv: KV = KV.EXACT  # how skipped layers are filled (engine.modes.Mode.kv): decides `early_exit_saving`
    check: dict[str, float] = field(default_factory=dict)  # per checked exit
    per_token: dict[str, float] = field(default_factory=dict)  # a measure's prepare + observe, once per token

    def token(self, depth: int) -> float:
        """The cost of one token through `depth` layers and the head, overhead excluded."""
        return depth * self.layer + self.head

    def ideal_ratio(self, depth: int, num_layers: int) -> float:
        return self.token(num_layers) / self.token(depth)

    def early_exit_saving(self, exit_layer, num_layers: int):
        """Seconds a token saves by leaving at `exit_layer` (a number or a tensor): with exact K/V its backlog is
        drained later; with propagated K/V each skipped layer still stores its K/V projections."""
        if self.kv == KV.PROPAGATE:
            return (num_layers - exit_layer) * (self.layer - self.kv_fill)
        return (num_layers - exit_layer) * self.layer * (1.0 - self.drain)

    def to_dict(self) -> dict:
        return asdict(self)


def no_sync() -> None:
    """Nothing to wait for: on a CPU the work is done when the call returns."""


def device_sync(device: torch.device):
    """What to call before reading a clock: a GPU runs the queued kernels after the Python call returns."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    if device.type == "mps":
        return torch.mps.synchronize
    return no_sync


def _median_seconds(fn, inner: int, rounds: int, clock=time.perf_counter, sync=no_sync) -> float:
    samples = []
    for _ in range(rounds):
        sync()
        t = clock()
        for _ in range(inner):
            fn()
        sync()
        samples.append((clock() - t) / inner)
    return statistics.median(samples)


@torch.inference_mode()
def measure_costs(
    sm: SortedModel, context: int = 192, measures: dict | None = None, inner: int = 10, rounds: int = 7,
    clock=time.perf_counter,
) -> Costs:
    """Time the pieces on this machine, on a state holding `context` positions of text (`text_ids`).

    `measures` (name -> measure) are the confidence measures to time; by default every registered one
    this model can build (a classifier needs its calibrated file). `clock` is the benchmark's clock."""

    def median_seconds(fn: Callable[[], object]) -> float:
        return _median_seconds(fn, inner, rounds, clock, device_sync(sm.device))

    probe = CostProbe(sm, max(2, min(context, (sm.max_positions or context + 2) - 2)))
    layers = time_layers(probe, median_seconds)
    hidden = probe.next_hidden()
    greedy_heads = probe.greedy_heads()
    greedy_heads()  # the first greedy step chooses the head's screen (`HeadProduct.screen`)
    head = median_seconds(greedy_heads) / len(probe.last_hidden)
    costs = Costs(head=head, context=probe.context, **layers)
    time_checks(costs, probe, hidden, buildable_measures(sm) if measures is None else measures, median_seconds)
    return costs


def text_ids(sm: SortedModel, count: int) -> list[int]:
    """`count` token ids of English text (the bench's built-in prompts, repeated). The head's cost depends on
    them: a screen recomputes in float32 every token that may be the argmax, many where the next token is a near-tie
    (which random ids make common and chat text rare: bfloat16's screen, when it fell back on a near-tie, did so on
    38 of 64 steps of random ids and 1 of 144 greedy steps of chat)."""
    text = "\n".join(m["content"] for conversation in load_prompts() for m in conversation)
    ids = sm.tokenizer(text, add_special_tokens=False)["input_ids"]
    return (ids * (count // len(ids) + 1))[:count]


class CostProbe:
    """What the costs are timed on: the state a session on `sm` decodes with, holding `context` positions of text
    (`text_ids`, so every run times the same work), and two more ids to decode next."""

    HEAD_POSITIONS = 8  # the head is timed on the last layer's output at this many positions, one at a time

    def __init__(self, sm: SortedModel, context: int):
        self.sm, self.context = sm, context
        self.ids = text_ids(sm, context + 2)
        self.state = ChatSession(sm).state
        self.last_hidden = self.state.run(sm.num_layers, self.ids[:context])[0, -self.HEAD_POSITIONS :]

    def step(self, depth: int, positions: int = 1, propagate: bool = False) -> Callable[[], None]:
        """A call that runs the next `positions` ids through `depth` layers (then, with `propagate`, stores
        the skipped layers' K/V) and crops the state back to `context` positions, so it can run again."""

        def run():
            self.state.run(depth, self.ids[self.context : self.context + positions])
            if propagate:
                self.state.propagate()
            self.state.crop(self.context)

        return run

    def greedy_heads(self) -> Callable[[], None]:
        """The head of a greedy full-depth step on each of `last_hidden`, as the session calls it."""
        sm = self.sm

        def run():
            for hidden in self.last_hidden:
                sm.head(hidden[None], sm.num_layers, greedy=True)

        return run

    def next_hidden(self) -> torch.Tensor:
        """The last layer's hidden state of the next id, which the head and the checks are timed on."""
        hidden = self.state.run(self.sm.num_layers, [self.ids[self.context]])[:, -1]
        self.state.crop(self.context)
        return hidden


def time_layers(probe: CostProbe, median_seconds: Timer) -> dict[str, float]:
    """The `Costs` fields of the engine's steps: `layer` (depth L against depth 1, per layer), `step` (the rest
    of a step but the head), `drain` (one more position at full depth), `kv_fill` (propagating at depth 1)."""
    L, low = probe.sm.num_layers, 1
    for d, n in ((low, 1), (L, 1), (L, 2)):
        probe.step(d, n)()  # warm-up
    t_low = median_seconds(probe.step(low))
    t_high = median_seconds(probe.step(L))
    t_two = median_seconds(probe.step(L, 2))
    layer = max(t_high - t_low, 0.0) / max(L - low, 1)
    drain = min(max((t_two - t_high) / (L * layer), 0.0), 1.0) if layer > 0 else 0.0
    kv_fill = max(median_seconds(probe.step(low, propagate=True)) - t_low, 0.0) / max(L - low, 1)
    return {"layer": layer, "step": max(t_low - layer, 0.0), "drain": drain, "kv_fill": kv_fill}


def buildable_measures(sm: SortedModel) -> dict:
    """Every registered confidence measure this model can build, by name."""
    measures = {}
    for name in MEASURES:
        try:
            measures[name] = make_measure(name, sm)
        except SortedChatError:  # e.g. no trained classifier for this model
            pass
    return measures


def time_checks(costs: Costs, probe: CostProbe, hidden: torch.Tensor, measures: dict, median_seconds: Timer) -> None:
    """Per measure, into `costs`: what it does once per token (`per_token`: prepare + observe) and one check
    at the first exit (`check`)."""
    sm, ids, context = probe.sm, probe.ids, probe.context
    exit_layer = sm.exits[0] if len(sm.exits) > 1 else sm.num_layers
    logits = sm.head(hidden, sm.num_layers)[0]
    for name, measure in measures.items():
        measure.observe(ids[context], logits)
        costs.per_token[name] = median_seconds(lambda m=measure: (m.prepare(ids), m.observe(ids[context], logits)))
        costs.check[name] = median_seconds(lambda m=measure: m(hidden, exit_layer))
