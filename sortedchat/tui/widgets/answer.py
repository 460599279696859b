"""One assistant answer: its tokens coloured by the layer they exited at, or the same text as Markdown.

The depth view is a column of `TokenBlock`s, one per paragraph (a block ends after a token that ends a
line). Only the last block changes while the model streams, so a batch of tokens repaints one short
block instead of the whole answer, and a new layout is asked for only when that block grows taller.
Blocks build Textual `Content` directly, one span per token carrying the token's index as style meta:
a click reads the index under the mouse; Left/Right move a cursor over the tokens. Either way the
answer posts `TokenText.Selected`, and the app fills the layer lens.
"""

from __future__ import annotations

from collections.abc import Iterable

from textual.binding import Binding
from textual.containers import Vertical
from textual.content import Content, Span
from textual.geometry import Region
from textual.message import Message
from textual.reactive import reactive
from textual.style import Style
from textual.widget import Widget

from sortedchat.tui.colours import themed_exit_colour
from sortedchat.tui.depth import mode_range
from sortedchat.tui.storage import StoredToken
from sortedchat.tui.widgets.code import AnswerMarkdown

# Control characters would shift span offsets when Content strips them, so they go first (tab and newline stay).
CONTROL = dict.fromkeys([*range(0, 9), *range(11, 32), 127])


class TokenBlock(Widget):
    """The tokens of one paragraph. Its final line break is left out: the next block starts below anyway."""

    DEFAULT_CSS = "TokenBlock { height: auto; min-height: 1; }"

    def __init__(self):
        super().__init__()
        self.pieces: list[str] = []
        self.spans: list[Span] = []
        self.length = 0
        self.cursor: tuple[int, int] | None = None
        self.content = Content("")
        self._height: int | None = None

    def add(self, text: str, style: Style) -> tuple[int, int]:
        start = self.length
        if text:
            self.pieces.append(text)
            self.length += len(text)
            self.spans.append(Span(start, self.length, style))
        return start, self.length

    def ends_line(self) -> bool:
        return bool(self.pieces) and self.pieces[-1].endswith("\n")

    def update(self) -> None:
        text = "".join(self.pieces)
        if text.endswith("\n"):
            text = text[:-1]
        self.content = Content(text, list(self.spans), strip_control_codes=False)
        width = self.size.width
        height = self.content.get_height(self.styles, width) if width else None
        if height is None or height != self._height:
            self._height = height
            self.refresh(layout=True)
        else:
            self.refresh()

    def line_of(self, offset: int) -> int:
        """The row of the block, as wrapped to its width, that shows character `offset`."""
        text, row, pos = self.content.plain, 0, 0
        for i, line in enumerate(self.content.wrap(max(1, self.size.width))):
            found = text.find(line.plain, pos)
            if found > offset:
                break
            row, pos = i, found + len(line.plain)
        return row

    def show_cursor(self, span: tuple[int, int] | None) -> None:
        self.cursor = span
        self.refresh()

    def render(self) -> Content:
        if self.cursor is None:
            return self.content
        return self.content.stylize("reverse", *self.cursor)


class TokenText(Vertical, can_focus=True):
    """The depth view of an answer."""

    DEFAULT_CSS = "TokenText { height: auto; }"

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
        self.places: list[tuple[TokenBlock, int, int]] = []  # each token's block and character range in it
        self.blocks = [TokenBlock()]
        self._colours: dict[int, Style] = {}
        self._revealing: int | None = None  # the token `reveal` will scroll to after the next refresh

    def compose(self):
        yield from self.blocks

    def on_mount(self) -> None:
        # Blocks started between compose and mount (a reopened chat adds its tokens at once).
        late = [b for b in self.blocks if b.parent is None]
        if late:
            self.mount_all(late)

    def on_resize(self) -> None:
        """Rewrapped (the conversation's scrollbar appeared as the layer lens opened, or the terminal narrowed):
        the token being inspected may have moved down a row or more, with the conversation's own size unchanged."""
        self.keep_cursor_in_view()

    def keep_cursor_in_view(self) -> None:
        """While the user inspects tokens here (focused, one selected), a layout change scrolls it back into view."""
        if self.cursor is not None and self.has_focus:
            self.reveal(self.cursor)

    def _colour(self, layer: int) -> Style:
        if layer not in self._colours:
            self._colours[layer] = Style.parse(themed_exit_colour(self.app, layer, self.num_layers, self.first_exit))
        return self._colours[layer]

    def _style(self, index: int) -> Style:
        return self._colour(self.tokens[index].exit_layer) + Style.from_meta({"token": index})

    def recolour(self) -> None:
        """Draw every token again in the current theme's exit colours."""
        self._colours.clear()
        for block in self.blocks:
            block.spans = []
        for index, (block, start, end) in enumerate(self.places):
            if end > start:
                block.spans.append(Span(start, end, self._style(index)))
        for block in self.blocks:
            block.update()

    def add(self, tokens: Iterable[StoredToken]) -> None:
        changed, new = {self.blocks[-1]}, []
        for tok in tokens:
            if self.blocks[-1].ends_line():
                self.blocks.append(TokenBlock())
                new.append(self.blocks[-1])
                changed.add(self.blocks[-1])
            block = self.blocks[-1]
            self.tokens.append(tok)
            start, end = block.add(tok.text.translate(CONTROL), self._style(len(self.tokens) - 1))
            self.places.append((block, start, end))
        for block in changed:
            block.update()
        if new and self.is_mounted:
            self.mount_all(new)

    @property
    def plain(self) -> str:
        """The answer's text as generated (control characters included)."""
        return "".join(t.text for t in self.tokens)

    def watch_cursor(self, old: int | None, new: int | None) -> None:
        if old is not None:
            self.places[old][0].show_cursor(None)
        if new is not None:
            block, start, end = self.places[new]
            block.show_cursor((start, end))

    def shown_indices(self) -> list[int]:
        """Indices of the tokens that show text (not the end-of-turn token, not half a character)."""
        return [i for i, (_, start, end) in enumerate(self.places) if end > start]

    def reveal(self, index: int) -> None:
        """Scroll what holds the answer so that token `index` is in view (the layer lens, opening below, may
        have just taken the lower half of the conversation). Done after the next refresh, on the layout that
        the change asking for it brings."""
        if self._revealing is None:
            self.call_after_refresh(self._scroll_to_revealed)
        self._revealing = index

    def _scroll_to_revealed(self) -> None:
        """The token's row is placed from the layout alone (each widget's place in its parent's content), not
        from where it was last drawn: a scroll not yet drawn (another reveal's, or the conversation following
        its end) would otherwise shift the target by that scroll, and the view would land off the token."""
        index, self._revealing = self._revealing, None
        holder = next((w for w in self.ancestors if isinstance(w, Widget) and w.allow_vertical_scroll), None)
        if holder is None:
            return
        block, start, _ = self.places[index]
        y, widget = block.line_of(start), block
        while widget is not holder:
            y += widget.virtual_region.y
            widget = widget.parent
            if widget is not holder:
                y += widget.styles.gutter.top
        holder.scroll_to_region(Region(0, y, 1, 1), animate=False, immediate=True)

    def select(self, index: int) -> None:
        self.cursor = index
        self.post_message(self.Selected(self, index))

    def on_mouse_down(self, event) -> None:
        self._pressed_at = event.screen_offset

    def on_click(self, event) -> None:
        """A click selects the token under it; a press released elsewhere selected text, and is left alone."""
        if event.screen_offset != getattr(self, "_pressed_at", event.screen_offset):
            return
        index = event.style.meta.get("token")
        if index is not None:
            self.focus()
            self.select(index)

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
        self.markdown_view = AnswerMarkdown()
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

    def show_modes(self, modes: list[str]) -> None:
        """The header names every mode the answer was generated in (the user may change it mid-answer)."""
        self.border_title = f"assistant · {mode_range(modes)}"

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
