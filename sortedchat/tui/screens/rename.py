"""Rename a chat: one line of text, Enter keeps it, Esc leaves the title as it was (its footer says so)."""

from __future__ import annotations

from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Footer, Input, Static

TITLE_LENGTH = 80


class RenameScreen(ModalScreen[str | None]):
    """Dismisses with the new title (stripped, never empty), or None."""

    BINDINGS = [Binding("enter", "keep", "Keep", priority=True), Binding("escape", "dismiss(None)", "Cancel")]

    def __init__(self, title: str):
        super().__init__()
        self.title_now = title

    def compose(self):
        with Vertical(id="rename"):
            yield Static("Rename chat", classes="dialog-title")
            yield Input(self.title_now, max_length=TITLE_LENGTH, id="title", compact=True)
        yield Footer()

    def action_keep(self) -> None:
        title = self.query_one(Input).value.strip()
        if title:
            self.dismiss(title)
        else:
            self.notify("A chat needs a title.", severity="warning")
