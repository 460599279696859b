"""What the model is doing: the status line, a sparkline of recent exit layers, and the exit legend."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

from rich.text import Text
from textual.widget import Widget
from textual.widgets import Static

from sortedchat.engine import GenerationStats
from sortedchat.palette import exit_colour


def status_text(model: str, mode: str, stats: GenerationStats | None, show_speed: bool = True,
                generating: bool = False) -> str:
    """Model · mode · tokens/s · tokens · mean exit · acceptance and tokens the pacer decoded at full depth
    (speculative only) · compute saved."""
    parts = [model, mode]
    if stats is None or not stats.tokens:
        parts.append("generating…" if generating else "ready")
        return " · ".join(parts)
    if show_speed:
        parts.append(f"{stats.tokens_per_second:.1f} tok/s")
    parts += [f"{stats.tokens} tokens", f"mean exit {stats.mean_exit:.1f}/{stats.num_layers}"]
    if stats.acceptance_rate is not None:
        parts.append(f"accepted {stats.acceptance_rate:.0%}")
    if stats.paced:
        parts.append(f"{stats.paced} undrafted")
    parts.append(f"saved {stats.compute_saved:.0%}")
    if not generating and stats.stopped == "interrupted":
        parts.append("stopped")
    return " · ".join(parts)


class StatusBar(Static):
    pass


class ExitSparkline(Widget):
    """Exit layer of the most recent tokens, newest on the right, one column each.

    Textual's `Sparkline` scales between the smallest and largest value shown, so a run of tokens
    all at full depth would draw as the lowest bar; here the scale is fixed (0 .. number of layers)
    and each bar takes its exit's colour, as in the conversation.
    """

    BARS = "▁▂▃▄▅▆▇█"

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
        shown = list(self.exit_layers)[-width:]
        line = Text(" " * (width - len(shown)), no_wrap=True, end="")
        for layer in shown:
            bar = self.BARS[min(len(self.BARS) - 1, round(layer / self.num_layers * (len(self.BARS) - 1)))]
            line.append(bar, style=exit_colour(layer, self.num_layers, self.first_exit))
        return line


class ExitLegend(Static):
    def __init__(self, exits: list[int], num_layers: int, **kwargs):
        legend = Text("exits ", style="dim")
        for e in exits:
            legend.append("██", style=exit_colour(e, num_layers, exits[0]))
            legend.append(f" {e}  ")
        legend.append("shallow → full depth", style="dim")
        super().__init__(legend, **kwargs)
