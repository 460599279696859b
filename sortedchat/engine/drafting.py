"""Speculative decoding's own state, beside the session: how many tokens the next round drafts (adaptive: one
more after a round whose drafts all passed, the accepted count plus one after a rejection) and the `Pacer` that
measures whether drafting pays. transformers' candidate generator owns its draft length the same way.

A `Drafter` is for one draft depth and one starting length (`Mode.depth`, `Mode.draft_len`): a later mode that
asks for another gets a new one, starting at its own length with a fresh pacer."""

from __future__ import annotations

from dataclasses import dataclass, field

from sortedchat.engine.pacing import Pacer

MAX_DRAFT = 16  # the most tokens one round drafts, whatever the adaptive length has grown to


@dataclass
class Drafter:
    depth: int
    start_len: int
    length: int = 0  # tokens the next round drafts (0: `start_len`)
    pacer: Pacer = field(default_factory=Pacer)

    def __post_init__(self) -> None:
        self.length = self.length or self.start_len

    def is_for(self, depth: int, start_len: int) -> bool:
        return (self.depth, self.start_len) == (depth, start_len)

    def restart(self) -> None:
        """Draft the starting length again (a new request on a reused session); the pacer's figures stay."""
        self.length = self.start_len

    def size(self, budget: int) -> int:
        """Tokens to draft this round: the adaptive length, leaving one of the answer's `budget` to verification."""
        return max(1, min(self.length, budget - 1, MAX_DRAFT))

    def verified(self, accepted: int, drafted: int) -> None:
        """Draft more when everything passed, less after a rejection."""
        self.length = min(MAX_DRAFT, self.length + 1) if accepted == drafted else max(1, accepted + 1)
