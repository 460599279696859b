"""Terminal rendering of a streamed answer: tokens coloured by exit layer, and a one-line summary."""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING

from rich.cells import cell_len
from rich.console import Console
from rich.control import Control, ControlType
from rich.text import Text

from sortedchat.palette import exit_colour

if TYPE_CHECKING:  # the engine imports torch: `sortedchat --help` must not wait for it
    from sortedchat.engine import GenerationStats, TokenEvent

STOPPED = {  # why an answer ended, where it was not its own end of turn
    "max_tokens": "stopped at --max-new-tokens",
    "context": "stopped: the context is full",
    "repetition": "stopped: it repeated itself (--no-repeat-stop lets an answer run on)",
    "interrupted": "stopped",
}


class AnswerPrinter:
    """Prints events as they come: coloured text on a terminal, plain text otherwise, or JSON lines."""

    def __init__(self, num_layers: int, first_exit: int, as_json: bool = False, console: Console | None = None):
        self.console = console or Console(highlight=False)
        self.num_layers, self.first_exit, self.as_json = num_layers, first_exit, as_json
        self.colour = self.console.is_terminal and not as_json
        self.reading = False  # the prompt pass's progress line shows

    def prefill(self, done: int, total: int) -> None:
        """How far a long prompt pass is, on one line that the answer's first token replaces (terminals only)."""
        if self.console.is_terminal and not self.as_json:
            self._clear_line()
            self.console.print(Text(f"reading the prompt: {done:,}/{total:,} tokens", style="dim"), end="")
            self.reading = True

    def _clear_line(self) -> None:
        """Back to the line's start, erasing it (rich drops a bare carriage return from printed text)."""
        self.console.control(Control.move_to_column(0), Control((ControlType.ERASE_IN_LINE, 2)))

    def token(self, ev: TokenEvent) -> None:
        if self.reading:
            self._clear_line()
            self.reading = False
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
        self.console.print(fold_items(summary_parts(stats), self.console.width), style="dim", highlight=False)


def fold_items(items: list[str], width: int) -> str:
    """Items joined by " · ", a line break before an item that would pass `width`: never one inside an item."""
    lines = [items[0]]
    for item in items[1:]:
        if cell_len(lines[-1]) + 3 + cell_len(item) <= width:
            lines[-1] += f" · {item}"
        else:
            lines.append(item)
    return "\n".join(lines)


def summary_parts(stats: GenerationStats) -> list[str]:
    """The answer's figures: its tokens and decoding speed, the prompt pass apart (its own speed and time, and how
    much of the prompt was reused from the turn before), exits, compute, context fill, and why it stopped."""
    parts = [f"{stats.tokens} tokens", f"{stats.tokens_per_second:.1f} tok/s"]
    if stats.prefilled_tokens:
        reused = f", {stats.reused_tokens} reused" if stats.reused_tokens else ""
        parts.append(f"prompt {stats.prefilled_tokens} tokens at {stats.prefill_tokens_per_second:.0f} tok/s "
                     f"({stats.prefill_seconds:.1f} s{reused})")
    note = f" ({stats.compute_note})" if stats.compute_note else ""
    parts += [f"mean exit {stats.mean_exit:.1f}/{stats.num_layers}",
              f"layer compute saved {stats.compute_saved:.0%}{note}"]
    if stats.acceptance_rate is not None:
        parts.append(f"accepted {stats.acceptance_rate:.0%} of drafts ({stats.accepted_per_verification:.2f}/verify)")
    if stats.paced:
        parts.append(f"{stats.paced} at full depth (drafting was slower)")
    if stats.context_limit:
        parts.append(f"context {stats.context_fill:.0%} of {stats.context_limit}")
    if stats.stopped in STOPPED:
        parts.append(STOPPED[stats.stopped])
    return parts
