"""What a `SamplingConfig` holds and may hold, without torch: the app's settings file and dialog check their
values with the same `RANGES` the engine checks a config with, before anything heavy loads."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from sortedchat import SortedChatError

# Each checked field and what it must be: the one statement of these ranges (the command line's flags, the
# server's body, the settings file and the settings dialog all come here).
RANGES: dict[str, tuple[Callable[[float], bool], str]] = {
    "temperature": (lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0"),
    "top_p": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "top_k": (lambda v: v >= 0, ">= 0"),
    "max_new_tokens": (lambda v: v >= 1, ">= 1"),
}


def range_problem(name: str, value: float) -> str | None:
    """What is wrong with `value` for the field `name` ("must be in (0, 1]"); None when it fits."""
    fits, what = RANGES[name]
    return None if fits(value) else f"must be {what}"


@dataclass
class SamplingConfig:
    """How tokens are chosen, and how long an answer may run. With `stop_at_end_of_turn` False an answer goes
    on past the model's end-of-turn tokens (they are then ordinary tokens, text included) to exactly
    `max_new_tokens`: the bench's protocol, so that every mode does the same work. `repeat_stop` ends an answer
    that loops (`engine/repetition.py`); an answer that must run to `max_new_tokens` never stops for that."""

    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    max_new_tokens: int = 256
    stop_at_end_of_turn: bool = True
    repeat_stop: bool = True

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    def validate(self) -> "SamplingConfig":
        for name in RANGES:
            value = getattr(self, name)
            if problem := range_problem(name, value):
                raise SortedChatError(f"--{name.replace('_', '-')} {problem}, got {value}")
        return self
