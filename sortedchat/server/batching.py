"""Batched decode steps: the fixed-depth steps of concurrent requests share the weight reads.

On a CPU a decoding step reads every weight of the layers it runs for one token; several requests' tokens in one
call of a layer read them once. Before a round of the scheduler, `prefetch` runs the next token of every request
that will take a fixed-depth step (depth or full mode), each on its own `LayeredState`, as one batch: the tokens
ride together through the layers they share (a token at depth 21 and one at 30 go through layers 1..21 as one
batch, then the deeper one alone), each attending to its own K/V, and the head runs once per depth for all of them.
A request's step then takes its logits (`BatchedSession`) instead of computing its own; its sampling, its events
and its stats are the session's own, unchanged. Auto and speculative steps, and a request's first step (its
prompt), run as before, one request at a time.

The layers are transformers' own, called with batch size n over a `_PaddedKV`: each request's K/V copied into one
tensor padded to the longest, the padding masked out, the new token's K/V appended behind it and then stored in
each request's own cache. A batched product sums in another order than a single row's, so a batched answer can
differ from a single-stream one where two tokens are within rounding of each other (rare; greedy answers are
otherwise the same).
"""

from __future__ import annotations

import torch

from sortedchat.engine.events import Step
from sortedchat.engine.session import ChatSession
from sortedchat.hf_contract import GrowingLayer, cache_keyword


class BatchedSession(ChatSession):
    """A `ChatSession` whose next fixed-depth step may have been computed ahead, in a batch (`ready`)."""

    def __init__(self, sm, mode=None):
        super().__init__(sm, mode)
        self.ready: tuple[int, int, torch.Tensor] | None = None  # (token fed, depth, logits [V])

    def generate_ids(self, *args, **kwargs):
        self.ready = None  # computed for an answer that ended before taking it: not this answer's
        return super().generate_ids(*args, **kwargs)

    def _depth_step(self, token: int, depth: int, sampler) -> Step:
        ready, self.ready = self.ready, None
        if ready is None:
            return super()._depth_step(token, depth, sampler)
        if ready[:2] != (token, depth):  # the batch fed the state another token: nothing would be right after it
            raise RuntimeError(f"a batched step fed token {ready[0]} at depth {ready[1]}, the answer needs "
                               f"{token} at {depth}")
        token_out, confidence = sampler.pick(ready[2])
        return Step(token_out, confidence, depth)


def can_batch(session: ChatSession, depth: int) -> bool:
    """Whether the session's next step at `depth` fits a batch: every layer it runs holds every position (no
    backlog to drain) in a plain growing cache (no sliding window), and the context has room for the token."""
    state = session.state
    n = state.length
    limit = session.sm.max_positions
    return (n > 0 and (not limit or n + 1 < limit) and state.kv_len[depth - 1] == n
            and all(state.waiting[i] is None for i in range(depth))
            and all(type(state.cache.layers[i]) is GrowingLayer for i in range(depth)))


class _PaddedKV:
    """One layer's K/V of several requests, padded to the longest, as the `cache` a transformers layer updates:
    `update` returns them with the new token's K/V behind the padding, and keeps those (`new`)."""

    def __init__(self, layers: list, lengths: list[int]):
        longest = max(lengths)
        first = layers[0].keys
        shape = (len(layers), first.shape[1], longest, first.shape[3])
        self.keys, self.values = first.new_zeros(shape), first.new_zeros(shape)
        for row, (layer, n) in enumerate(zip(layers, lengths)):
            self.keys[row, :, :n] = layer.keys[0]
            self.values[row, :, :n] = layer.values[0]
        self.new: tuple[torch.Tensor, torch.Tensor] | None = None

    def update(self, key_states, value_states, *args, **kwargs):
        self.new = (key_states, value_states)
        return torch.cat([self.keys, key_states], dim=2), torch.cat([self.values, value_states], dim=2)


def _mask(lengths: list[int], device) -> torch.Tensor | None:
    """Each row sees its own positions and the new token, not the padding (None when nothing is padded)."""
    longest = max(lengths)
    if min(lengths) == longest:
        return None
    keys = torch.arange(longest + 1, device=device)
    own = keys[None, :] < torch.tensor(lengths, device=device)[:, None]
    return (own | (keys == longest)[None, :])[:, None, None, :]


@torch.inference_mode()
def prefetch(sm, sessions: list[BatchedSession], tokens: list[int], depths: list[int]) -> None:
    """Feed `tokens[b]` to `sessions[b]` through its first `depths[b]` layers, all in one batch, and leave each
    session its logits (`ready`). Every session must `can_batch` at its depth."""
    order = sorted(range(len(sessions)), key=lambda b: -depths[b])  # deepest first: the rows still going on
    sessions = [sessions[b] for b in order]  # through a layer are always the first ones
    tokens, depths = [tokens[b] for b in order], [depths[b] for b in order]
    states = [s.state for s in sessions]
    lengths = [st.length for st in states]
    device = sm.device
    x = sm.embed(torch.tensor(tokens, device=device)[:, None])
    positions = torch.tensor(lengths, device=device)[:, None]
    cos, sin = sm.rotary(x, positions)
    outs: list[torch.Tensor | None] = [None] * len(states)
    live = len(states)
    mask = _mask(lengths, device)
    for i in range(depths[0]):
        if depths[live - 1] <= i:
            while depths[live - 1] <= i:  # rows whose depth is reached leave with the previous layer's output
                live -= 1
                outs[live] = x[live : live + 1]
            x, mask = x[:live], _mask(lengths[:live], device)
        kv = _PaddedKV([st.cache.layers[i] for st in states[:live]], lengths[:live])
        layer = sm.layers[i]
        x = layer(x, attention_mask=mask, position_ids=positions[:live],
                  use_cache=True, position_embeddings=(cos[:live], sin[:live]), **{cache_keyword(type(layer)): kv})
        keys, values = kv.new
        for row, st in enumerate(states[:live]):
            st.cache.layers[i].update(keys[row : row + 1], values[row : row + 1])
            st.kv_len[i] += 1
            st.layer_evals += 1
    for row in range(live):
        outs[row] = x[row : row + 1]
    for st, token, depth, out in zip(states, tokens, depths, outs):
        st.tokens.append(token)
        st.filled_by.append(st.num_layers)
        if depth < st.num_layers:
            waiting = st.waiting[depth]
            st.waiting[depth] = out if waiting is None else torch.cat([waiting, out], dim=1)
    for depth in sorted(set(depths)):  # one head product per depth
        rows = [b for b, d in enumerate(depths) if d == depth]
        logits = sm.head(torch.cat([outs[b][:, -1] for b in rows]), depth)
        for j, b in enumerate(rows):
            sessions[b].ready = (tokens[b], depth, logits[j])
