"""The message box: a multi-line TextArea where Enter sends and Ctrl+J starts a new line (both remappable).

↑ on the first line and ↓ on the last walk through the messages sent before (across chats, from the chat
file), as in a shell; ↓ past the newest brings back what was being typed.
"""

from __future__ import annotations

from textual import events
from textual.binding import Binding
from textual.message import Message
from textual.widgets import TextArea

from sortedchat.tui.settings import ACTIONS


class PromptInput(TextArea):
    BINDINGS = [
        Binding(ACTIONS["send"].keys, "submit", ACTIONS["send"].label, id="send"),
        Binding(ACTIONS["newline"].keys, "newline", ACTIONS["newline"].label, id="newline",
                show=ACTIONS["newline"].shown),
    ]

    class Submitted(Message):
        def __init__(self, text: str):
            super().__init__()
            self.text = text

    def __init__(self, **kwargs):
        super().__init__(soft_wrap=True, show_line_numbers=False, compact=True, **kwargs)
        self.sent: list[str] = []  # oldest first
        self._browsing: int | None = None  # the history entry shown, while browsing
        self._draft = ""

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

    # -- history ------------------------------------------------------------------------------------
    def remember(self, text: str) -> None:
        """Add a sent message (or a draft put aside) to the history; browsing starts again from the end."""
        if text and (not self.sent or self.sent[-1] != text):
            self.sent.append(text)
        self._browsing = None

    def _show(self, text: str) -> None:
        self.text = text
        self.move_cursor(self.document.end)

    def action_cursor_up(self, select: bool = False) -> None:
        if select or self.cursor_location[0] > 0 or not self.sent:
            super().action_cursor_up(select)
            return
        if self._browsing is None:
            self._draft, self._browsing = self.text, len(self.sent)
        if self._browsing > 0:
            self._browsing -= 1
            self._show(self.sent[self._browsing])

    def action_cursor_down(self, select: bool = False) -> None:
        if select or self._browsing is None or self.cursor_location[0] < self.document.line_count - 1:
            super().action_cursor_down(select)
            return
        self._browsing += 1
        if self._browsing < len(self.sent):
            self._show(self.sent[self._browsing])
        else:
            self._browsing = None
            self._show(self._draft)
