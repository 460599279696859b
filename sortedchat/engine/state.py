"""The layered KV state: each decoder layer has its own KV length, and positions a token left behind
wait, as hidden states, at the input of the first layer that has not seen them.

Invariants (README, "How the engine works"): kv_len[0] >= kv_len[1] >= ... >= kv_len[L-1]; `waiting[i]` holds the
input of layer i for positions kv_len[i] .. kv_len[i-1]-1; every stored K/V equals what the full
model computes for those tokens. Running layer i always consumes its whole backlog plus whatever comes
from below in one batched call, so nothing is approximated and nothing is copied upward.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from sortedchat.sorted_model import SortedModel


class GrowingLayer(DynamicLayer):
    """A `DynamicLayer` that writes each token's K/V into a buffer instead of concatenating.

    `DynamicLayer.update` copies the layer's whole cache on every call (`torch.cat`): at a few hundred
    positions that is a few percent of a CPU decoding step (BENCHMARKS.md). Here `keys`/`values` are views of
    the first positions of a buffer whose capacity doubles when full, so a step writes only its own
    positions. `crop` is still `DynamicLayer`'s slice, a view of the same buffer, and the next update
    overwrites what was cropped."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self._buffers = None
        n, q = self.get_seq_length(), key_states.shape[-2]
        buffers = self._buffers
        # Rebuild when full, when something replaced keys/values with tensors of their own, or when buffers made
        # under inference mode are written outside it (torch forbids that in place).
        if (
            buffers is None
            or n + q > buffers[0].shape[-2]
            or (n and self.keys.data_ptr() != buffers[0].data_ptr())
            or (buffers[0].is_inference() and not torch.is_inference_mode_enabled())
        ):
            capacity = max(64, 2 * (n + q))
            buffers = tuple(
                new.new_empty((*new.shape[:-2], capacity, new.shape[-1])) for new in (key_states, value_states)
            )
            if n:
                buffers[0][..., :n, :] = self.keys
                buffers[1][..., :n, :] = self.values
            self._buffers = buffers
        buffers[0][..., n : n + q, :] = key_states
        buffers[1][..., n : n + q, :] = value_states
        self.keys, self.values = buffers[0][..., : n + q, :], buffers[1][..., : n + q, :]
        return self.keys, self.values


class LayeredState:
    def __init__(self, sm: SortedModel):
        self.sm = sm
        self.num_layers = sm.num_layers
        self.reset()

    def reset(self) -> None:
        self.cache = DynamicCache(config=self.sm.model.config)
        # Plain full-attention layers grow in place; sliding-window and other kinds keep their own class.
        self.cache.layers = [GrowingLayer() if type(x) is DynamicLayer else x for x in self.cache.layers]
        self.kv_len = [0] * self.num_layers
        self.waiting: list[torch.Tensor | None] = [None] * (self.num_layers + 1)  # [L] stays empty
        self.tokens: list[int] = []  # the token at each position every layer-1 K/V covers
        self.layer_evals = 0  # (layer, position) evaluations run, for compute accounting

    @property
    def length(self) -> int:
        return self.kv_len[0] if self.num_layers else 0

    def run(self, depth: int, new_ids: list[int] | None = None) -> torch.Tensor | None:
        """Bring layers 1..depth up to date (their backlog plus `new_ids`) and return the output of
        layer `depth` for every position that layer just processed, [1, q, H], or None if it had
        nothing to do. Those outputs wait at layer depth+1 unless depth is the last layer."""
        sm = self.sm
        x = None
        if new_ids:
            ids = torch.tensor([new_ids], device=sm.device)
            x = sm.embed(ids)
            self.tokens.extend(new_ids)
        # Rotary tables once per call, for every position any layer will process.
        starts = [self.kv_len[i] for i in range(depth) if x is not None or self.waiting[i] is not None]
        if not starts:
            return None
        first, end = min(starts), self.length if x is None else self.kv_len[0] + x.shape[1]
        positions = torch.arange(first, end, device=sm.device)[None]
        cos, sin = sm.rotary(self._any_hidden(x), positions)
        layers, spans = sm.layers, ((None, None),)
        for i in range(depth):
            backlog = self.waiting[i]
            if backlog is None and x is None:
                continue
            inp = x if backlog is None else backlog if x is None else torch.cat([backlog, x], dim=1)
            start = self.kv_len[i]
            q = inp.shape[1]
            lo = start - first
            mask = None
            if q > 1:
                keys = torch.arange(start + q, device=sm.device)
                mask = (keys[None, :] <= (start + torch.arange(q, device=sm.device))[:, None])[None, None]
            if (lo, q) != spans[0]:  # the slices of the last layer still fit in the common case: no backlog
                spans = ((lo, q), positions[:, lo : lo + q], (cos[:, lo : lo + q], sin[:, lo : lo + q]))
            x = layers[i](
                inp,
                attention_mask=mask,
                position_ids=spans[1],
                past_key_values=self.cache,
                use_cache=True,
                position_embeddings=spans[2],
            )
            self.kv_len[i] = start + q
            self.waiting[i] = None
            self.layer_evals += q
        if depth < self.num_layers and x is not None:
            w = self.waiting[depth]
            self.waiting[depth] = x if w is None else torch.cat([w, x], dim=1)
        return x

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

    def check_invariants(self) -> None:
        """Assert the invariants of the module docstring (used by tests)."""
        for i in range(1, self.num_layers):
            assert self.kv_len[i - 1] >= self.kv_len[i], (i, self.kv_len)
            w = self.waiting[i]
            assert (0 if w is None else w.shape[1]) == self.kv_len[i - 1] - self.kv_len[i], (i, self.kv_len)
            assert self.cache.layers[i].get_seq_length() == self.kv_len[i]
        assert len(self.tokens) == self.length
