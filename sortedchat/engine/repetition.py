"""Stopping an answer that repeats itself.

Shallow exits of a small model fall into loops ("The intressa's. The intressa's. …") and would write them to
the token limit. An answer stops (`GenerationStats.stopped == "repetition"`) once its last tokens are one
sequence of at most MAX_PERIOD tokens repeated: at least MIN_REPEATS times in a row and over at least MIN_SPAN
tokens, so that a row of short repeats (a rule drawn with dashes, a list of numbers) is not mistaken for one.
`SamplingConfig.repeat_stop` (`--no-repeat-stop`, `[chat] repeat_stop = false`) turns it off.
"""

from __future__ import annotations

MAX_PERIOD = 64  # the longest repeated sequence looked for, in tokens
MIN_REPEATS = 3
MIN_SPAN = 32  # tokens the repeats must cover together


class RepetitionGuard:
    """Watches an answer's tokens as they come. For each period p it counts how many of the latest tokens equal
    the token p before them: a count of n means the last n + p tokens repeat with period p."""

    def __init__(self):
        self.tokens: list[int] = []
        self.runs = [0] * (MAX_PERIOD + 1)

    def push(self, token: int) -> bool:
        """Add the answer's next token; True when the answer now ends in a loop."""
        tokens, runs = self.tokens, self.runs
        tokens.append(token)
        looping = False
        for p in range(1, min(MAX_PERIOD, len(tokens) - 1) + 1):
            if tokens[-1] == tokens[-1 - p]:
                runs[p] += 1
                looping = looping or runs[p] + p >= max(MIN_REPEATS * p, MIN_SPAN)
            else:
                runs[p] = 0
        return looping
