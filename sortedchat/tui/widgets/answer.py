"""One assistant answer: its tokens coloured by the layer they exited at, or the same text as Markdown.

The depth view keeps one Rich `Text` that grows as tokens arrive (appending is cheap, re-rendering the
whole answer per batch is not needed). Every token's span carries its index as style meta, so a click
names the token under the mouse; Left/Right move a cursor over the tokens. Either way the answer posts
`TokenText.Selected`, and the app fills the layer lens.
"""

from __future__ import annotations

from collections.abc import Iterable

from rich.style import Style
from rich.text import Text
from textual.binding import Binding
from textual.containers import Vertical
from textual.message import Message
from textual.reactive import reactive
from textual.widget import Widget
from textual.widgets import Markdown

from sortedchat.palette import exit_colour
from sortedchat.tui.storage import StoredToken


class TokenText(Widget, can_focus=True):
    """The depth view of an answer."""

    BINDINGS = [
        Binding("left", "move(-1)", "Previous token", show=False),
        Binding("right", "move(1)", "Next token", show=False),
        Binding("home", "edge(0)", "First token", show=False),
        Binding("end", "edge(1)", "Last token", show=False),
    ]

    cursor: reactive[int | None] = reactive(None, layout=False)

    class Selected(Message):
        """A token was chosen for the layer lens."""

        def __init__(self, view: "TokenText", index: int):
            super().__init__()
            self.view = view
            self.index = index

    def __init__(self, num_layers: int, first_exit: int):
        super().__init__()
        self.num_layers, self.first_exit = num_layers, first_exit
        self.tokens: list[StoredToken] = []
        self.spans: list[tuple[int, int]] = []  # character range of each token in `self.text`
        self.text = Text(end="")

    def add(self, tokens: Iterable[StoredToken]) -> None:
        for tok in tokens:
            start = len(self.text)
            if tok.text:
                colour = exit_colour(tok.exit_layer, self.num_layers, self.first_exit)
                self.text.append(tok.text, Style(color=colour, meta={"token": len(self.tokens)}))
            self.tokens.append(tok)
            self.spans.append((start, len(self.text)))
        self.refresh(layout=True)

    @property
    def plain(self) -> str:
        return self.text.plain

    def render(self) -> Text:
        if self.cursor is None or not self.text:
            return self.text
        shown = self.text.copy()
        start, end = self.spans[self.cursor]
        shown.stylize("reverse", start, end)
        return shown

    def shown_indices(self) -> list[int]:
        """Indices of the tokens that show text (not the end-of-turn token, not half a character)."""
        return [i for i, (start, end) in enumerate(self.spans) if end > start]

    def select(self, index: int) -> None:
        self.cursor = index
        self.post_message(self.Selected(self, index))

    def on_click(self, event) -> None:
        index = event.style.meta.get("token")
        if index is not None:
            self.focus()
            self.select(index)

    def on_focus(self) -> None:
        if self.cursor is None and self.shown_indices():
            self.select(self.shown_indices()[-1])

    def action_move(self, step: int) -> None:
        shown = self.shown_indices()
        if not shown:
            return
        if self.cursor is None:
            self.select(shown[-1])
            return
        after = [i for i in shown if (i > self.cursor if step > 0 else i < self.cursor)]
        if after:
            self.select(after[0] if step > 0 else after[-1])

    def action_edge(self, last: int) -> None:
        shown = self.shown_indices()
        if shown:
            self.select(shown[-1] if last else shown[0])


class AnswerView(Vertical):
    """An answer and what produced it: `context` is the conversation it answers (the lens needs it)."""

    def __init__(self, context: list[dict], num_layers: int, first_exit: int, mode_label: str = "",
                 markdown: bool = False):
        super().__init__(classes="answer")
        self.context = context
        self.depth_view = TokenText(num_layers, first_exit)
        self.markdown_view = Markdown()
        self.markdown = markdown
        self.border_title = "assistant" + (f" · {mode_label}" if mode_label else "")

    def compose(self):
        yield self.depth_view
        yield self.markdown_view

    def on_mount(self) -> None:
        self.set_markdown(self.markdown)

    @property
    def text(self) -> str:
        return self.depth_view.plain

    @property
    def tokens(self) -> list[StoredToken]:
        return self.depth_view.tokens

    def add_tokens(self, tokens: Iterable[StoredToken]) -> None:
        self.depth_view.add(tokens)
        if self.markdown:
            self.markdown_view.update(self.text)

    def set_markdown(self, on: bool) -> None:
        self.markdown = on
        self.depth_view.display = not on
        self.markdown_view.display = on
        if on:
            self.markdown_view.update(self.text)
