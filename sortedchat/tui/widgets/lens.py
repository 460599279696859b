"""The layer lens: for the selected token, what every exit would have predicted at that position.

It answers "why did this token leave where it did": the exit it left at is marked, and the chosen
token is underlined wherever it appears among an exit's top predictions. The extra forward pass runs on a
worker thread; only the latest selection's result is shown.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.text import Text
from textual import work
from textual.containers import VerticalScroll
from textual.message import Message
from textual.widgets import Static

from sortedchat.tui.colours import themed_exit_colour
from sortedchat.tui.settings import key_name

if TYPE_CHECKING:
    from sortedchat.sorted_model import SortedModel
    from sortedchat.tui.storage import StoredToken
    from sortedchat.tui.widgets.answer import AnswerView

TOP_K = 4  # predictions shown per exit
VISIBLE = {" ": "␣", "\n": "⏎", "\t": "⇥"}


def show_piece(piece: str) -> str:
    """A token's text with whitespace and control characters made visible."""
    out = "".join(VISIBLE.get(c, c if c.isprintable() else f"\\x{ord(c):02x}") for c in piece)
    return out or "∅"


class LayerLens(VerticalScroll):
    class Predicted(Message, bubble=False):
        """The worker's result for selection number `request`: exit -> [(token id, text, probability)]."""

        def __init__(self, request: int, rows: dict[int, list[tuple[int, str, float]]]):
            super().__init__()
            self.request, self.rows = request, rows

    def __init__(self, sm: SortedModel):
        super().__init__(id="lens")
        self.sm = sm
        self.num_layers, self.first_exit = sm.num_layers, sm.exits[0]
        self.border_title = "layer lens"
        self.header = Static(id="lens-header")  # its first text names the remappable stop key: `compose`
        self.shown: tuple | None = None  # the arguments of the predictions on show, to redraw them
        self._request = 0  # counts selections: a worker's result for an earlier one is dropped
        self._selected: tuple[int, StoredToken] | None = None  # the latest selection: its index and token

    def inspect(self, answer: AnswerView, index: int) -> None:
        """Show every exit's predictions for token `index` of `answer`."""
        self.display = True
        token = answer.tokens[index]
        self._request += 1
        self._selected = (index, token)
        self.show_pending(token.text, index)
        self._predict(self._request, answer.context, [t.token_id for t in answer.tokens[:index]])

    @work(thread=True, exclusive=True, group="lens")
    def _predict(self, request: int, context: list[dict], before: list[int]) -> None:
        from sortedchat.engine.context import encode_chat

        preds = self.sm.exit_top_predictions(encode_chat(self.sm, context) + before, k=TOP_K)
        decode = self.sm.tokenizer.decode
        self.post_message(self.Predicted(request, {e: [(tid, decode([tid]), p) for tid, p in preds[e]]
                                                   for e in sorted(preds)}))

    async def on_layer_lens_predicted(self, message: Predicted) -> None:
        if message.request != self._request:
            return  # the user has selected another token since
        index, token = self._selected
        await self.show_predictions(token.text, index, token.token_id, token.exit_layer, token.confidence,
                                    message.rows)

    def compose(self):
        stop = key_name(self.app.settings.keymap(), "stop", self.app.get_key_display)
        self.header.update(f"Select a token: click it, or focus an answer and use ← →. {stop} closes.")
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
