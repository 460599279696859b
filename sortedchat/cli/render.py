"""Terminal rendering of a streamed answer: tokens coloured by exit layer, and a one-line summary."""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING

from rich.console import Console
from rich.text import Text

from sortedchat.palette import exit_colour

if TYPE_CHECKING:  # the engine imports torch: `sortedchat --help` must not wait for it
    from sortedchat.engine import GenerationStats, TokenEvent


class AnswerPrinter:
    """Prints events as they come: coloured text on a terminal, plain text otherwise, or JSON lines."""

    def __init__(self, num_layers: int, first_exit: int, as_json: bool = False, console: Console | None = None):
        self.console = console or Console(highlight=False)
        self.num_layers, self.first_exit, self.as_json = num_layers, first_exit, as_json
        self.colour = self.console.is_terminal and not as_json

    def token(self, ev: TokenEvent) -> None:
        if self.as_json:
            sys.stdout.write(json.dumps({"event": "token", **ev.to_dict()}) + "\n")
            sys.stdout.flush()
        elif ev.text:
            style = exit_colour(ev.exit_layer, self.num_layers, self.first_exit) if self.colour else None
            self.console.print(Text(ev.text, style=style), end="", soft_wrap=True)

    def summary(self, stats: GenerationStats) -> None:
        if self.as_json:
            sys.stdout.write(json.dumps({"event": "summary", **stats.to_dict()}) + "\n")
            return
        self.console.print()
        self.console.print(summary_line(stats), style="dim", highlight=False)


def summary_line(stats: GenerationStats) -> str:
    parts = [
        f"{stats.tokens} tokens",
        f"{stats.tokens_per_second:.1f} tok/s",
        f"mean exit {stats.mean_exit:.1f}/{stats.num_layers}",
        f"layer compute saved {stats.compute_saved:.0%}",
    ]
    if stats.acceptance_rate is not None:
        parts.append(f"accepted {stats.acceptance_rate:.0%} of drafts ({stats.accepted_per_verification:.2f}/verify)")
    if stats.paced:
        parts.append(f"{stats.paced} at full depth (drafting was slower)")
    if stats.stopped and stats.stopped != "eos":
        parts.append(f"stopped: {stats.stopped}")
    return " · ".join(parts)
