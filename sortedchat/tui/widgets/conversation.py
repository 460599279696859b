"""The scrolling conversation: the user's messages and the assistant's answers, in order; a welcome while empty.

It owns what it shows: its answers, the Markdown or depth view of all of them, and where the view follows."""

from __future__ import annotations

from collections.abc import Iterable

from rich.table import Table
from rich.text import Text
from textual.containers import VerticalScroll
from textual.widgets import Static

from sortedchat.tui.storage import StoredMessage, StoredToken
from sortedchat.tui.widgets.answer import AnswerView, TokenText

# (action, what it does) in the welcome, two to a row; the keys are the user's (remapped) ones.
WELCOME_KEYS = [
    ("shallower", "shallower"), ("deeper", "deeper"),
    ("auto", "auto depth"), ("speculative", "speculative"),
    ("lens", "layer lens"), ("view", "Markdown view"),
    ("regenerate", "regenerate"), ("copy", "copy answer"),
    ("chats", "saved chats"), ("help", "every key"),
]


class Welcome(Static):
    """What an empty chat shows: how to start, how to read the colours, and the main keys."""

    def __init__(self, keys: dict[str, str]):
        grid = Table.grid(padding=(0, 2, 0, 0))
        for _ in range(2):
            grid.add_column(style="bold", no_wrap=True)
            grid.add_column(no_wrap=True)
        for i in range(0, len(WELCOME_KEYS), 2):
            row = []
            for action, what in WELCOME_KEYS[i:i + 2]:
                row += [keys[action], what]
            grid.add_row(*row)
        intro = Text.assemble(
            ("Type a message below; ", ""), (keys["send"], "bold"), (" sends it.\n", ""),
            ("Each token is coloured by the exit it left the model at (legend above).\n", "dim"),
        )
        super().__init__(_stack(intro, grid), id="welcome")


def _stack(*renderables) -> Table:
    table = Table.grid()
    for r in renderables:
        table.add_row(r)
    return table


class UserMessage(Static):
    def __init__(self, text: str):
        super().__init__(text, markup=False, classes="user")
        self.border_title = "you"


class Conversation(VerticalScroll):
    """Follows the newest text while the view is at the bottom; leaves a reader scrolled up alone. Every answer
    shows in depth colours, or all as rendered Markdown (`markdown`)."""

    welcome_keys: dict[str, str] | None = None  # action -> key as shown; set by the screen

    def __init__(self, num_layers: int, first_exit: int, **kwargs):
        super().__init__(**kwargs)
        self.num_layers, self.first_exit = num_layers, first_exit
        self.markdown = False
        self.last_answer: AnswerView | None = None  # the one tokens go to (kept: a query per batch would walk them all)

    def on_resize(self) -> None:
        """Smaller (the layer lens opened below, or the terminal shrank): the token the lens describes stays in view."""
        focused = self.app.focused
        if isinstance(focused, TokenText) and self in focused.ancestors:
            focused.keep_cursor_in_view()

    def show_welcome(self) -> None:
        if self.welcome_keys is not None and not self.children:
            self.mount(Welcome(self.welcome_keys))

    def _leave_welcome(self) -> None:
        self.query(Welcome).remove()

    def add_user(self, text: str) -> UserMessage:
        self._leave_welcome()
        message = UserMessage(text)
        self.mount(message)
        self.scroll_end(animate=False)
        return message

    def add_answer(self, context: list[dict], mode_label: str) -> AnswerView:
        """A new answer to `context`, generated in the mode `mode_label` names; it takes tokens as they come."""
        self._leave_welcome()
        answer = self.last_answer = AnswerView(context, self.num_layers, self.first_exit, mode_label,
                                               markdown=self.markdown)
        self.mount(answer)
        self.scroll_end(animate=False)
        return answer

    def add_tokens(self, tokens: Iterable[StoredToken]) -> None:
        """Add to the last answer; the view follows it only if it was at the bottom."""
        at_bottom = self.scroll_y >= self.max_scroll_y - 1
        self.last_answer.add_tokens(tokens)
        if at_bottom:
            self.scroll_end(animate=False)

    def show_chat(self, messages: list[StoredMessage]) -> None:
        """A saved chat's messages, each answer with the conversation it answered (the layer lens needs it)."""
        context: list[dict] = []
        for m in messages:
            if m.role == "user":
                self.add_user(m.content)
            elif m.role == "assistant":
                self.add_answer(list(context), m.mode).add_tokens(m.tokens)
            context.append({"role": m.role, "content": m.content})

    def answers(self) -> list[AnswerView]:
        return list(self.query_children(AnswerView))

    def set_markdown(self, on: bool) -> None:
        self.markdown = on
        for answer in self.answers():
            answer.set_markdown(on)

    def recolour(self) -> None:
        """Draw every answer again in the current theme's exit colours."""
        for answer in self.answers():
            answer.depth_view.recolour()

    async def remove_last_turn(self) -> None:
        await self.query_children(UserMessage).last().remove()
        await self.answers()[-1].remove()
        self.last_answer = (self.answers() or [None])[-1]

    async def clear(self) -> None:
        await self.remove_children()
        self.last_answer = None
        self.show_welcome()
