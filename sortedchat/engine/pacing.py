"""Speculative mode decodes at full depth while drafting is the slower way, and tries drafting again later.

Drafting pays when verifying n positions costs little more than one (a GPU) and drafts are often accepted.
On a CPU with a weakly trained model neither holds: on the shipped SmolLM2 model drafting at exit 24 runs
at about 0.6x of full depth (BENCHMARKS.md). The pacer measures both ways as they run, seconds per
produced token of speculative rounds and of full-depth steps (moving averages), and while drafting is
slower it has the session run full-depth steps, probing drafting again after a pause that doubles each time
drafting loses (up to `max_pause` tokens). Output does not depend on it: verified drafts and full-depth
steps both yield the full model's tokens (or, sampling, its distribution), up to float32 rounding between
the batched verification and a single step. Each `engine.drafting.Drafter` (one draft depth and length) has its
own; while drafting keeps winning, `full_rate` is not measured again (it is probed only after a loss).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Pacer:
    smoothing: float = 0.3  # weight of the newest measurement in each moving average
    first_pause: int = 4  # full-depth tokens after drafting first loses (also the first full-depth measurement)
    max_pause: int = 64
    draft_rate: float | None = None  # seconds per token, speculative rounds
    full_rate: float | None = None  # seconds per token, full-depth steps
    pause: int = 0  # full-depth tokens still to run before the next speculative round
    next_pause: int = 0

    def __post_init__(self) -> None:
        self.next_pause = self.next_pause or self.first_pause

    def draft_now(self) -> bool:
        return self.pause <= 0

    def _average(self, old: float | None, new: float) -> float:
        return new if old is None else (1 - self.smoothing) * old + self.smoothing * new

    def record_full(self, seconds: float, tokens: int = 1) -> None:
        self.full_rate = self._average(self.full_rate, seconds / tokens)
        self.pause -= tokens

    def record_draft(self, seconds: float, tokens: int) -> None:
        self.draft_rate = self._average(self.draft_rate, seconds / tokens)
        if self.full_rate is None:
            self.pause = self.first_pause  # nothing to compare with yet: measure full depth for a few tokens
        elif self.draft_rate > self.full_rate:
            self.pause = self.next_pause
            self.next_pause = min(2 * self.next_pause, self.max_pause)
        else:
            self.next_pause = self.first_pause
