"""Rename a chat: one line of text, Enter keeps it, Esc leaves the title as it was."""

from __future__ import annotations

from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Input, Static

TITLE_LENGTH = 80


class RenameScreen(ModalScreen[str | None]):
    """Dismisses with the new title (stripped, never empty), or None."""

    BINDINGS = [Binding("escape", "dismiss(None)", "Cancel")]

    def __init__(self, title: str):
        super().__init__()
        self.title_now = title

    def compose(self):
        with Vertical(id="rename"):
            yield Static("Rename chat  (Enter keeps it · Esc cancels)", classes="dialog-title")
            yield Input(self.title_now, max_length=TITLE_LENGTH, id="title", compact=True)

    def on_input_submitted(self, event: Input.Submitted) -> None:
        title = event.value.strip()
        if title:
            self.dismiss(title)
        else:
            self.notify("A chat needs a title.", severity="warning")
