"""The layer lens: for the selected token, what every exit would have predicted at that position.

It answers "why did this token leave where it did": the exit it left at is marked, and the chosen
token is underlined wherever it appears among an exit's top predictions.
"""

from __future__ import annotations

from rich.text import Text
from textual.containers import VerticalScroll
from textual.widgets import Static

from sortedchat.tui.colours import themed_exit_colour


VISIBLE = {" ": "␣", "\n": "⏎", "\t": "⇥"}


def show_piece(piece: str) -> str:
    """A token's text with whitespace and control characters made visible."""
    out = "".join(VISIBLE.get(c, c if c.isprintable() else f"\\x{ord(c):02x}") for c in piece)
    return out or "∅"


class LayerLens(VerticalScroll):
    def __init__(self, num_layers: int, first_exit: int):
        super().__init__(id="lens")
        self.num_layers, self.first_exit = num_layers, first_exit
        self.border_title = "layer lens"
        self.header = Static("Select a token: click it, or focus an answer and use ← →. Esc closes.",
                             id="lens-header")
        self.shown: tuple | None = None  # the arguments of the predictions on show, to redraw them

    def compose(self):
        yield self.header

    def show_pending(self, piece: str, index: int) -> None:
        self.header.update(Text(f"token {index} {show_piece(piece)!r}: running every exit…"))
        self.loading = True

    async def show_predictions(self, piece: str, index: int, token_id: int, exit_layer: int, confidence: float,
                         rows: dict[int, list[tuple[int, str, float]]]) -> None:
        """`rows`: exit -> [(token id, text, probability)], best first."""
        self.shown = (piece, index, token_id, exit_layer, confidence, rows)
        self.loading = False
        head = Text()
        head.append(f"token {index} ")
        head.append(show_piece(piece), style="bold")
        head.append(f" left at exit {exit_layer} ({confidence:.0%})")
        self.header.update(head)
        await self.remove_children(".lens-row")
        widgets = []
        for e, preds in rows.items():
            line = Text()
            line.append(f"{e:>3} ", style=f"bold {themed_exit_colour(self.app, e, self.num_layers, self.first_exit)}")
            line.append("◀ " if e == exit_layer else "  ")
            for j, (tid, text, p) in enumerate(preds):
                style = "underline bold" if tid == token_id else ""
                line.append(f"{show_piece(text)}", style=style)
                line.append(f" {p:.0%}" + ("  " if j < len(preds) - 1 else ""), style="dim")
            widgets.append(Static(line, classes="lens-row"))
        await self.mount_all(widgets)

    async def recolour(self) -> None:
        """Draw the predictions on show again in the current theme's exit colours."""
        if self.shown is not None:
            await self.show_predictions(*self.shown)
