"""The layered KV state: each decoder layer has its own KV length, and positions a token left behind
wait, as hidden states, at the input of the first layer that has not seen them.

Invariants (README, "How the engine works"): kv_len[0] >= kv_len[1] >= ... >= kv_len[L-1]; `waiting[i]` holds the
input of layer i for positions kv_len[i] .. kv_len[i-1]-1. Running layer i always consumes its whole backlog plus
whatever comes from below in one batched call, so with exact K/V (`run` alone) nothing is approximated and nothing
is copied upward: every stored K/V equals what the full model computes for those tokens.

Propagated K/V (`propagate`, CALM's copy: Schuster et al., 2022) is the one approximation. It takes every waiting
position up through the layers above it without running them: each of those layers stores only the K/V
projections (its input norm, k/v projections, k-norm if any, rotary at the position) of the hidden state the
position waits with, i.e. the output of the layer it exited at. Afterwards nothing waits. `filled_by[p]` records
how many layers computed position p: layers 1..filled_by[p] hold what the layers computed, layers above it hold the
projections of the hidden state leaving layer filled_by[p] (num_layers: no propagated K/V at p). A position is
propagated at most once, so these approximate K/V stay as they are: a later exact token attends to them
(switching back to exact never re-prefills), and every K/V computed by a layer is what that layer computes given
the K/V stored before it, which is a full prefill's only where no earlier position was propagated.
"""

from __future__ import annotations

import weakref

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from sortedchat import SortedChatError
from sortedchat.engine.compiled import with_compiled
from sortedchat.engine.layer_step import LayerStep, Span, TransformersCall, own_step_matches
from sortedchat.hf_contract import GrowingLayer, kv_projection
from sortedchat.quantize import weight_count
from sortedchat.sorted_model import SortedModel


class RotaryTable:
    """The rotary embedding's cos/sin for positions 0..n-1, computed once by the model's own rotary module and
    sliced per call (the module computes each position independently, so a slice holds the same numbers).
    Rotary variants whose frequencies depend on the sequence length (dynamic, longrope) are computed per call."""

    def __init__(self, sm: SortedModel):
        self.sm = sm
        rope = str(getattr(sm.model.model.rotary_emb, "rope_type", "default"))
        self.fixed = "dynamic" not in rope and "longrope" not in rope
        self.cos = self.sin = None

    def span(self, like: torch.Tensor, first: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [1, end - first, head_dim] for positions first..end-1, in `like`'s dtype."""
        if not self.fixed:
            return self.sm.rotary(like, torch.arange(first, end, device=like.device)[None])
        if (
            self.cos is None
            or end > self.cos.shape[1]
            or self.cos.dtype != like.dtype
            or (self.cos.is_inference() and not torch.is_inference_mode_enabled())  # autograd may not save them
        ):
            size = max(256, 2 * end)
            self.cos, self.sin = self.sm.rotary(like, torch.arange(size, device=like.device)[None])
        return self.cos[:, first:end], self.sin[:, first:end]


def causal_mask(start: int, q: int, device: torch.device) -> torch.Tensor | None:
    """The boolean mask of q positions from `start` over a layer's K/V (None for one position: it sees all)."""
    if q == 1:
        return None
    keys = torch.arange(start + q, device=device)
    return (keys[None, :] <= (start + torch.arange(q, device=device))[:, None])[None, None]


class LayerSteps(list):
    """Each layer's step: the engine's own `LayerStep`, or the layer called through transformers. `all_own` when
    none goes through transformers, which alone needs position ids."""

    all_own: bool = False


_MATCHES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {layer's key: bool}


def layer_steps(sm: SortedModel, cache) -> LayerSteps:
    """The steps of `sm`'s layers on `cache`; whether a layer's own step matches is probed once per model, layer,
    cache layer kind and the kinds of the layer's modules (an adapter wrapping a projection is probed anew)."""
    known = _MATCHES.setdefault(sm.model, {})
    steps = LayerSteps()
    for i, layer in enumerate(sm.layers):
        kind = type(cache.layers[i])
        key = (i, kind, tuple(type(m) for m in layer.modules()))
        if key not in known:
            known[key] = own_step_matches(layer, kind, sm.model.config)
        steps.append(LayerStep(layer) if known[key] else TransformersCall(layer, cache))
    steps.all_own = all(step.own for step in steps)
    return with_compiled(sm, steps)  # the compiled step where `--compile` made one


class LayerPass:
    """One `LayeredState.run`, a layer at a time: `next_call` gives the next layer's index, input and `Span`,
    `done` takes that layer's output, `finish` leaves the last output waiting above and returns it. `run` drives
    one pass with the state's own steps; a caller holding the passes of several states can run the same layer of
    each in one call (`sortedchat serve` batches concurrent requests so)."""

    def __init__(self, state: "LayeredState", depth: int, new_ids: list[int] | None):
        self.state, self.depth = state, depth
        sm, kv_len, waiting = state.sm, state.kv_len, state.waiting
        self.x, self.i = None, 0
        if new_ids:
            self.x = sm.embed(torch.tensor([new_ids], device=sm.device))
            state.tokens.extend(new_ids)
            state.filled_by.extend([state.num_layers] * len(new_ids))
            first = kv_len[depth - 1]  # kv_len never grows with depth: the deepest layer starts first
            end = kv_len[0] + self.x.shape[1]
        else:
            busy = [i for i in range(depth) if waiting[i] is not None]
            if not busy:
                self.i = depth  # nothing to do
                return
            first, end = kv_len[busy[-1]], state.length
        # Rotary tables, positions and masks once per pass, sliced per layer: the common case (no backlog) slices
        # them once for every layer.
        self.first = first
        self.cos, self.sin = state.rotary.span(state._any_hidden(self.x), first, end)
        self.positions = torch.arange(first, end, device=sm.device)[None] if not state.steps.all_own else None
        self.span_key, self.span = None, None

    def next_call(self) -> tuple[int, torch.Tensor, Span] | None:
        """(layer index, its input [1, q, H], its span) of the next layer with work, or None when the pass is over."""
        waiting, kv_len = self.state.waiting, self.state.kv_len
        while self.i < self.depth:
            backlog, x = waiting[self.i], self.x
            if backlog is None and x is None:
                self.i += 1
                continue
            inp = x if backlog is None else backlog if x is None else torch.cat([backlog, x], dim=1)
            start, q = kv_len[self.i], inp.shape[1]
            if (start, q) != self.span_key:
                self.span_key, lo = (start, q), start - self.first
                positions = None if self.positions is None else self.positions[:, lo : lo + q]
                self.span = Span(positions, self.cos[:, lo : lo + q], self.sin[:, lo : lo + q],
                                 causal_mask(start, q, self.state.sm.device))
            self.q = q
            return self.i, inp, self.span
        return None

    def done(self, out: torch.Tensor) -> None:
        """The output of the layer `next_call` gave, whose K/V now hold its positions."""
        state, i = self.state, self.i
        state.kv_len[i] += self.q
        state.waiting[i] = None
        state.layer_evals += self.q
        self.x, self.i = out, i + 1

    def finish(self) -> torch.Tensor | None:
        state, x = self.state, self.x
        if self.depth < state.num_layers and x is not None:
            w = state.waiting[self.depth]
            state.waiting[self.depth] = x if w is None else torch.cat([w, x], dim=1)
        return x


class LayeredState:
    def __init__(self, sm: SortedModel):
        self.sm = sm
        self.num_layers = sm.num_layers
        self.rotary = RotaryTable(sm)
        self.reset()

    def reset(self) -> None:
        self.cache = DynamicCache(config=self.sm.model.config)
        # Plain full-attention layers grow in place; sliding-window and other kinds keep their own class.
        self.cache.layers = [GrowingLayer() if type(x) is DynamicLayer else x for x in self.cache.layers]
        self.steps = layer_steps(self.sm, self.cache)
        self.kv_len = [0] * self.num_layers
        self.waiting: list[torch.Tensor | None] = [None] * (self.num_layers + 1)  # [L] stays empty
        self.tokens: list[int] = []  # the token at each position every layer-1 K/V covers
        self.filled_by: list[int] = []  # per position: layers that computed its K/V (the rest were propagated)
        self.layer_evals = 0  # (layer, position) evaluations run, for compute accounting
        self.kv_fills = 0  # (layer, position) K/V projections stored by `propagate`

    @property
    def kv_fill_share(self) -> float:
        """What storing one position's propagated K/V in a layer costs, as a share of running the layer over it
        (by weights: the k/v projections against the whole layer; about 6% for SmolLM2)."""
        if not self.num_layers:
            return 0.0
        layer = self.sm.layers[0]
        attn = layer.self_attn
        return (weight_count(attn.k_proj) + weight_count(attn.v_proj)) / weight_count(layer)

    @property
    def length(self) -> int:
        return self.kv_len[0] if self.num_layers else 0

    def run(self, depth: int, new_ids: list[int] | None = None) -> torch.Tensor | None:
        """Bring layers 1..depth up to date (their backlog plus `new_ids`) and return the output of
        layer `depth` for every position that layer just processed, [1, q, H], or None if it had
        nothing to do. Those outputs wait at layer depth+1 unless depth is the last layer."""
        layer_pass = LayerPass(self, depth, new_ids)
        while (call := layer_pass.next_call()) is not None:
            i, inp, span = call
            layer_pass.done(self.steps[i](inp, span, self.cache.layers[i]))
        return layer_pass.finish()

    def propagate(self) -> int:
        """Store, in every layer above it, the K/V projections of each waiting position's hidden state, so that
        nothing waits (module docstring). Returns the number of (layer, position) K/V stored."""
        L = self.num_layers
        starts = [self.kv_len[i] for i in range(1, L) if self.waiting[i] is not None]
        if not starts:
            return 0
        first = min(starts)
        cos, sin = self.rotary.span(self._any_hidden(None), first, self.length)
        carry, fills = None, 0
        for i in range(1, L):
            w = self.waiting[i]
            if w is not None:  # positions kv_len[i] .. kv_len[i-1]-1 left layer i: they go up from here
                start = self.kv_len[i]
                self.filled_by[start : start + w.shape[1]] = [i] * w.shape[1]
                carry = w if carry is None else torch.cat([w, carry], dim=1)
                self.waiting[i] = None
            if carry is None:
                continue
            start, q = self.kv_len[i], carry.shape[1]
            lo = start - first
            keys, values = kv_projection(self.sm.layers[i], carry, (cos[:, lo : lo + q], sin[:, lo : lo + q]))
            self.cache.layers[i].update(keys, values)
            self.kv_len[i] = start + q
            fills += q
        self.kv_fills += fills
        return fills

    def refill(self, exit_layer: int, hidden: torch.Tensor) -> None:
        """Make the last position, which every layer holds, hold in layers exit_layer+1..L the K/V projections of
        `hidden` [1, 1, H], its output of layer `exit_layer`: what leaving there and `propagate` would have stored.
        Calibration uses it: it needs every exit's prediction at a position before it knows where it leaves."""
        p = self.length - 1
        if p < 0 or self.kv_len[-1] != self.length:
            raise SortedChatError("refill needs the last position in every layer")
        position_embeddings = self.rotary.span(hidden, p, p + 1)
        for i in range(exit_layer, self.num_layers):
            keys, values = kv_projection(self.sm.layers[i], hidden, position_embeddings)
            self.cache.layers[i].crop(-1)
            self.cache.layers[i].update(keys, values)
            self.kv_fills += 1
        self.filled_by[p] = min(self.filled_by[p], exit_layer)

    def _any_hidden(self, x: torch.Tensor | None) -> torch.Tensor:
        """A tensor with the model's dtype and device, for the rotary embedding's dtype."""
        if x is not None:
            return x
        return next(w for w in self.waiting if w is not None)

    def crop(self, n: int) -> None:
        """Forget every position >= n, in every layer's K/V and every waiting backlog."""
        old = list(self.kv_len)
        for i in range(self.num_layers):
            if old[i] > n:
                self.cache.layers[i].crop(n - old[i])
            self.kv_len[i] = min(old[i], n)
        for i in range(1, self.num_layers):
            w = self.waiting[i]
            if w is not None:
                keep = n - old[i]  # waiting[i] starts at position old kv_len[i]
                self.waiting[i] = None if keep <= 0 else w[:, :keep]
        del self.tokens[n:]
        del self.filled_by[n:]

    def check_invariants(self) -> None:
        """Assert the invariants of the module docstring (used by tests)."""
        for i in range(1, self.num_layers):
            assert self.kv_len[i - 1] >= self.kv_len[i], (i, self.kv_len)
            w = self.waiting[i]
            assert (0 if w is None else w.shape[1]) == self.kv_len[i - 1] - self.kv_len[i], (i, self.kv_len)
            assert self.cache.layers[i].get_seq_length() == self.kv_len[i]
        assert len(self.tokens) == len(self.filled_by) == self.length
        for p, filled in enumerate(self.filled_by):  # propagated positions are in every layer, and only there
            assert 1 <= filled <= self.num_layers, (p, filled)
            assert filled == self.num_layers or p < self.kv_len[-1], (p, filled, self.kv_len)
