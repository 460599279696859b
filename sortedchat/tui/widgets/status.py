"""What the model is doing: the status line and a sparkline of recent exit layers (the legend: `legend.py`)."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from rich.cells import cell_len
from rich.text import Text
from textual.widget import Widget
from textual.widgets import Static

from sortedchat.tui.colours import themed_exit_colour

if TYPE_CHECKING:
    from sortedchat.engine import GenerationStats


OPTIONAL = 5  # parts kept at least this loosely go before any other part is shortened
STOPPED = {  # why an answer ended, where the user should know: (full, short)
    "interrupted": ("stopped", "stopped"),
    "repetition": ("stopped: it repeated itself", "repeating"),
    "context": ("stopped: the context is full", "context full"),
}


@dataclass
class Part:
    """One figure of the status line: its full text, a shorter form, and how long it stays when space is short
    (`keep` 0 never goes; the highest goes first)."""

    text: str
    short: str
    keep: int


def figures_label(mode: str, answer_mode: str | None, generating: bool) -> list[Part]:
    """"last answer:" before the figures once the mode has changed since the answer they describe (F2, F3...),
    so that the new mode is not read as theirs."""
    if generating or answer_mode is None or answer_mode == mode:
        return []
    return [Part("last answer:", "last:", 2)]  # as needed as the figures after it, and dropped before them


def context_part(context: tuple[float, int] | None) -> list[Part]:
    """How full the model's context is, and how many of the chat's first turns it no longer sees."""
    if context is None:
        return []
    fill, unseen = context
    text = f"context {fill:.0%}"
    if unseen:
        text += " (turn 1 unseen)" if unseen == 1 else f" (turns 1–{unseen} unseen)"
    return [Part(text, f"ctx {fill:.0%}", 3)]


def status_parts(model: str, mode: str, stats: GenerationStats | None, show_speed: bool = True,
                 generating: bool = False, device=None, *, answer_mode: str | None = None,
                 context: tuple[float, int] | None = None, reading: tuple[int, int] | None = None,
                 threads: int | None = None) -> list[Part]:
    """Mode (and its options, such as the KV policy) · the answer's figures: tokens/s (and the prompt pass's) ·
    tokens · mean exit · drafts accepted and tokens the pacer decoded at full depth (speculative only) · compute
    saved · why it stopped · context fill (`context`: its share, and the first turns unseen) · model · device,
    or on a CPU torch's `threads` (what decides its speed there, `--threads`). `answer_mode` is the mode the
    answer ended in (`figures_label`); `reading` is how far a long prompt pass is, (tokens done, tokens in all),
    before the first token."""
    kind, *options = mode.split(" · ")
    parts = [Part(kind, kind, 0), *(Part(o, o, 1) for o in options)]
    if stats is None or not stats.tokens:
        state = "generating…" if generating else "ready"
        if generating and reading:
            state = f"reading the prompt: {reading[0]:,}/{reading[1]:,} tokens"
        parts.append(Part(state, state.split(":")[0], 1))
    else:
        parts += figures_label(mode, answer_mode, generating)
        if show_speed:
            speed = f"{stats.tokens_per_second:.1f} tok/s"
            prompt = f" (prompt {stats.prefill_tokens_per_second:.0f} tok/s)" if stats.prefilled_tokens else ""
            parts.append(Part(speed + prompt, speed, 2))
        parts.append(Part(f"{stats.tokens} tokens", f"{stats.tokens} tok", 4))
        parts.append(Part(f"mean exit {stats.mean_exit:.1f}/{stats.num_layers}", f"exit {stats.mean_exit:.1f}", 3))
        if stats.acceptance_rate is not None:
            accepted = f"{stats.acceptance_rate:.0%}"
            parts.append(Part(f"drafts accepted {accepted}", f"accepted {accepted}", 3))
        if stats.paced:
            parts.append(Part(f"{stats.paced} undrafted", f"{stats.paced} undrafted", 5))
        saved, note = f"{stats.compute_saved:.0%}", stats.compute_note
        parts.append(Part(f"compute saved {saved}", f"saved {saved}", 2))
        if note:  # what the figure means, when it is not what the exits suggest; the first to go when space is short
            parts.append(Part(f"({note})", "", OPTIONAL))
        if not generating and stats.stopped in STOPPED:
            parts.append(Part(*STOPPED[stats.stopped], 1))
    parts += context_part(context)
    short_model = model.removesuffix(" (default)")
    parts.append(Part(model, short_model, 6))
    if device is not None and str(device) != "cpu":
        parts.append(Part(str(device), str(device), 5))
    elif threads:  # kept longer than the model's name: at 80 columns it still shows
        count = f"{threads} thread" + ("s" if threads > 1 else "")
        parts.append(Part(count, count, 4))
    return parts


def fit_parts(parts: list[Part], width: int | None = None) -> str:
    """The parts joined by " · " within `width` cells (a part ending in ":" is a label, joined to the next by a
    space; it goes before the parts it labels; a part in brackets explains the one before it). While too long:
    the optional parts (`keep` >= 5, such as the model's name) go, then every part takes its short form, then
    parts go; the least needed first each time. The mode (`keep` 0) always stays."""
    shown = [p.text for p in parts]

    def line() -> str:
        texts = [t for t in shown if t]
        return "".join(t if i == 0 else (" " if texts[i - 1].endswith(":") or t.startswith("(") else " · ") + t
                       for i, t in enumerate(texts))

    order = sorted(range(len(parts)), key=lambda i: -parts[i].keep)
    steps = [(i, "") for i in order if parts[i].keep >= OPTIONAL]
    steps += [(i, parts[i].short) for i in order] + [(i, "") for i in order if parts[i].keep > 0]
    for i, text in steps:
        if width is None or cell_len(line()) <= width:
            break
        if shown[i]:  # a part already left out stays out
            shown[i] = text
    return line()


class StatusBar(Static):
    """The status line, fitted to its width whenever it is drawn (a resize shortens or restores it)."""

    def __init__(self, **kwargs):
        super().__init__("", markup=False, **kwargs)
        self.parts: list[Part] = []

    def show(self, parts: list[Part]) -> None:
        self.parts = parts
        self.refresh()

    def render(self) -> str:
        return fit_parts(self.parts, max(1, self.content_region.width))


class ExitSparkline(Widget):
    """Exit layer of the most recent tokens, newest on the right, one column each, after a "recent" label.

    Textual's `Sparkline` scales between the smallest and largest value shown, so a run of tokens
    all at full depth would draw as the lowest bar; here the scale is fixed (0 .. number of layers)
    and each bar takes its exit's colour, as in the conversation.
    """

    BARS = "▁▂▃▄▅▆▇█"
    LABEL = "recent exits "

    def __init__(self, num_layers: int, first_exit: int, **kwargs):
        super().__init__(**kwargs)
        self.num_layers, self.first_exit = num_layers, first_exit
        self.exit_layers: deque[int] = deque(maxlen=512)

    def extend(self, layers: Iterable[int], redraw: bool = True) -> None:
        self.exit_layers.extend(layers)
        if redraw:
            self.refresh()

    def clear(self) -> None:
        self.exit_layers.clear()
        self.refresh()

    def render(self) -> Text:
        width = max(1, self.size.width)
        line = Text(no_wrap=True, end="")
        if not self.exit_layers:
            return line
        label = self.LABEL if width > 2 * len(self.LABEL) else ""
        shown = list(self.exit_layers)[-(width - len(label)):]
        line.append(" " * (width - len(label) - len(shown)))
        line.append(label, style="dim")
        for layer in shown:
            bar = self.BARS[min(len(self.BARS) - 1, round(layer / self.num_layers * (len(self.BARS) - 1)))]
            line.append(bar, style=themed_exit_colour(self.app, layer, self.num_layers, self.first_exit))
        return line
