"""The exit legend: which colour is which exit and, where the checkpoint was evaluated, how usable each is.

A shallow exit is fast but may write loops; the figure that tells the user how far to trust a depth is its
measured agreement with full depth (`depth.exit_agreement`). With figures the legend is a small table, the
exits over their agreement, and takes two rows unless the terminal is wide enough for one; without them it
is one row, as before.
"""

from __future__ import annotations

from rich.text import Text
from textual.widget import Widget

from sortedchat.tui.colours import themed_exit_colour


class ExitLegend(Widget):
    """Which colour is which exit, the deepest marked as full depth, and each exit's agreement with full depth
    when known; the richest form that fits the width is shown, as many rows high as it has lines."""

    DEFAULT_CSS = "ExitLegend { height: auto; }"

    def __init__(self, exits: list[int], num_layers: int, agreement: dict[int, float] | None = None, **kwargs):
        super().__init__(**kwargs)
        self.exits, self.num_layers = exits, num_layers
        self.agreement = {e: a for e, a in (agreement or {}).items() if e in exits and e < num_layers}

    def forms(self) -> list[Text]:
        """Every form, the richest first; the last one is shown when none fits."""
        colours = [themed_exit_colour(self.app, e, self.num_layers, self.exits[0]) for e in self.exits]
        full = self.exits[-1] == self.num_layers
        compact = Text("exit ", style="dim")
        for e, colour in zip(self.exits, colours):
            compact.append(f"{e} ", style=f"bold {colour}")
        compact.append("(full)" if full else "", style="dim")
        if not self.agreement:
            return [self._swatches(colours, "shallow → full depth", lambda e: ""), compact]
        return [
            self._swatches(colours, "(%: tokens that agree with full depth)", self._percent),
            self._table(colours, " full depth" if full else "", " with full depth"),
            self._table(colours, " (full)" if full else "", ""),
            compact,
        ]

    def _percent(self, exit_layer: int) -> str:
        share = self.agreement.get(exit_layer)
        return "" if share is None else f" {share:.0%}"

    def _swatches(self, colours: list[str], note: str, figure) -> Text:
        """One row: "exits ██ 9 26%  ██ 12 29%  …  ██ 30  note"."""
        line = Text("exits ", style="dim")
        for e, colour in zip(self.exits, colours):
            line.append("██", style=colour)
            line.append(f" {e}{figure(e)}  ")
        line.append(note, style="dim")
        return line

    def _table(self, colours: list[str], exits_note: str, agree_note: str) -> Text:
        """Two rows, the agreement (in %) under its exit:
            exit    9 12 15 18 21 24 27 30 full depth
            agree% 26 29 33 36 48 61 72 with full depth"""
        figures = {e: f"{share * 100:.0f}" for e, share in self.agreement.items()}
        width = max(len(text) for text in [*map(str, self.exits), *figures.values()]) + 1
        top, bottom = Text("exit  ", style="dim"), Text("agree%", style="dim")
        for e, colour in zip(self.exits, colours):
            top.append(f"{e:>{width}}", style=f"bold {colour}")
            if e in figures:
                bottom.append(f"{figures[e]:>{width}}", style=colour)
        top.append(exits_note, style="dim")
        bottom.append(agree_note, style="dim")
        return Text("\n").join([top, bottom])

    def form_for(self, width: int) -> Text:
        forms = self.forms()
        return next((f for f in forms if max(line.cell_len for line in f.split()) <= width), forms[-1])

    def get_content_height(self, container, viewport, width: int) -> int:
        return len(self.form_for(width).split())

    def render(self) -> Text:
        return self.form_for(self.content_region.width)
