"""The message box: a multi-line TextArea where Enter sends and Ctrl+J starts a new line (both remappable)."""

from __future__ import annotations

from textual import events
from textual.binding import Binding
from textual.message import Message
from textual.widgets import TextArea


class PromptInput(TextArea):
    BINDINGS = [
        Binding("enter", "submit", "Send", id="send"),
        Binding("ctrl+j", "newline", "New line", id="newline", show=False),
    ]

    class Submitted(Message):
        def __init__(self, text: str):
            super().__init__()
            self.text = text

    def __init__(self, **kwargs):
        super().__init__(soft_wrap=True, show_line_numbers=False, compact=True, **kwargs)

    async def _on_key(self, event: events.Key) -> None:
        # TextArea inserts a newline for Enter before bindings are looked at; let our own bindings
        # (whatever keys the config gives them) win over that.
        active = self.screen.active_bindings.get(event.key)
        if active is not None and active.node is self:
            event.prevent_default()
            return
        await super()._on_key(event)

    def action_submit(self) -> None:
        text = self.text.strip()
        if text:  # the app clears the box once it takes the message
            self.post_message(self.Submitted(text))

    def action_newline(self) -> None:
        self.insert("\n")
