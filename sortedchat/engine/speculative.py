"""Which drafts the full model accepts: the longest prefix it agrees with (greedy), or speculative sampling's
accept/reject test (Leviathan et al., 2023), whose output follows the full model's distribution exactly.

Each function takes the drafted tokens and the full model's logits at the drafted positions plus one (the
prediction after the last draft), and returns how many drafts are accepted and the full model's own token
at the first position it did not accept (or after the last draft), as a `Step` at full depth.
"""

from __future__ import annotations

import torch

from sortedchat.engine.events import Step
from sortedchat.engine.sampling import Sampler


def verify(
    tokens: list[int], draft_probs: list[torch.Tensor], full_logits: torch.Tensor, sampler: Sampler, num_layers: int
) -> tuple[int, Step]:
    """`draft_probs`: each draft's distribution (sampling only; greedy drafts need none)."""
    if sampler.cfg.greedy:
        return _verify_greedy(tokens, full_logits, num_layers)
    return _verify_sampled(tokens, draft_probs, full_logits, sampler, num_layers)


def _verify_greedy(tokens: list[int], full_logits: torch.Tensor, num_layers: int) -> tuple[int, Step]:
    conf, pred = torch.softmax(full_logits.float(), dim=-1).max(dim=-1)
    pred, conf = pred.tolist(), conf.tolist()
    m = 0
    while m < len(tokens) and tokens[m] == pred[m]:
        m += 1
    return m, Step(pred[m], conf[m], num_layers)


def _verify_sampled(
    tokens: list[int], draft_probs: list[torch.Tensor], full_logits: torch.Tensor, sampler: Sampler, num_layers: int
) -> tuple[int, Step]:
    """Accept draft d with probability min(1, p(d) / q(d)); at the first rejection draw from the residual
    max(p - q, 0), renormalised; when every draft passes, draw the token after them from p."""
    target = sampler.distribution(full_logits)
    for m, (d, q, p) in enumerate(zip(tokens, draft_probs, target)):
        if sampler.uniform() < min(1.0, float(p[d]) / max(float(q[d]), 1e-20)):
            continue
        residual = torch.clamp(p - q, min=0)
        residual = residual / residual.sum() if residual.sum() > 0 else p
        token = sampler.draw(residual)
        return m, Step(token, float(p[token]), num_layers)
    n = len(tokens)
    token = sampler.draw(target[n])
    return n, Step(token, float(target[n][token]), num_layers)
