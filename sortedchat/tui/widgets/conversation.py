"""The scrolling conversation: the user's messages and the assistant's answers, in order."""

from __future__ import annotations

from textual.containers import VerticalScroll
from textual.widgets import Static

from sortedchat.tui.widgets.answer import AnswerView


class UserMessage(Static):
    def __init__(self, text: str):
        super().__init__(text, markup=False, classes="user")
        self.border_title = "you"


class Conversation(VerticalScroll):
    """Follows the newest text while the view is at the bottom; leaves a reader scrolled up alone."""

    def add_user(self, text: str) -> UserMessage:
        message = UserMessage(text)
        self.mount(message)
        self.scroll_end(animate=False)
        return message

    def add_answer(self, answer: AnswerView) -> AnswerView:
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
