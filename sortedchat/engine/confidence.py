"""Confidence measures for auto (instance-aware) early exit.

A measure looks at the hidden state leaving an exit and says how sure that exit is; auto mode stops at
the first exit whose confidence reaches its threshold. The paper's measure is the maximum softmax
probability of the exit's head. Measures return the logits when they computed them anyway, so the
chosen exit does not pay for its head twice.
"""

from __future__ import annotations

import torch

from sortedchat.sorted_model import SortedModel


class MaxProb:
    """Maximum softmax probability of the exit's full-vocabulary head (the paper's measure)."""

    name = "maxprob"

    def __init__(self, sm: SortedModel):
        self.sm = sm

    def reset(self) -> None:
        pass

    def __call__(self, hidden: torch.Tensor, exit_layer: int) -> tuple[float, torch.Tensor | None]:
        logits = self.sm.head(hidden, exit_layer)
        return float(torch.softmax(logits.float(), dim=-1).max()), logits

    def observe(self, token_id: int, full_logits: torch.Tensor | None) -> None:
        """Called after every emitted token (measures that track context use it)."""


MEASURES = {MaxProb.name: MaxProb}


def make_measure(name: str, sm: SortedModel):
    from sortedchat import SortedChatError

    if name not in MEASURES:
        raise SortedChatError(f"unknown confidence measure {name!r} (choose {', '.join(MEASURES)})")
    return MEASURES[name](sm)
