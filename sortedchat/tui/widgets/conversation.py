"""The scrolling conversation: the user's messages and the assistant's answers, in order; a welcome while empty."""

from __future__ import annotations

from rich.table import Table
from rich.text import Text
from textual.containers import VerticalScroll
from textual.widgets import Static

from sortedchat.tui.widgets.answer import AnswerView

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
    """Follows the newest text while the view is at the bottom; leaves a reader scrolled up alone."""

    welcome_keys: dict[str, str] | None = None  # action -> key as shown; set by the screen

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

    def add_answer(self, answer: AnswerView) -> AnswerView:
        self._leave_welcome()
        self.mount(answer)
        self.scroll_end(animate=False)
        return answer

    def follow(self, was_at_bottom: bool) -> None:
        if was_at_bottom:
            self.scroll_end(animate=False)

    @property
    def at_bottom(self) -> bool:
        return self.scroll_y >= self.max_scroll_y - 1

    def answers(self) -> list[AnswerView]:
        return list(self.query(AnswerView))

    async def clear(self) -> None:
        await self.remove_children()
        self.show_welcome()
