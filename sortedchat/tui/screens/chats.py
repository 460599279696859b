"""Saved chats: reopen one, delete it (asked twice), or export it to Markdown."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from textual.binding import Binding
from textual.containers import Vertical
from textual.message import Message
from textual.screen import ModalScreen
from textual.widgets import DataTable, Static

from sortedchat import SortedChatError
from sortedchat.tui.storage import ChatStore

TITLE = "Saved chats  (Enter open · d delete · e export to Markdown · Esc close)"


class ChatListScreen(ModalScreen[int | None]):
    """Dismisses with the id of the chat to open, or None. Posts `Deleted` for every chat it deletes."""

    BINDINGS = [
        Binding("escape", "dismiss(None)", "Close"),
        Binding("d,delete", "delete", "Delete"),
        Binding("e", "export", "Export to Markdown"),
    ]

    class Deleted(Message):
        def __init__(self, chat_id: int):
            super().__init__()
            self.chat_id = chat_id

    def __init__(self, store: ChatStore, export: Callable[[int], Path]):
        super().__init__()
        self.store = store
        self.export = export
        self.armed: int | None = None  # the chat the next `d` deletes

    def compose(self):
        with Vertical(id="chats"):
            yield Static(TITLE, classes="dialog-title")
            yield DataTable(cursor_type="row", zebra_stripes=True)

    def on_mount(self) -> None:
        table = self.query_one(DataTable)
        table.add_columns("chat", "model", "messages", "updated")
        try:
            chats = self.store.chats()
        except SortedChatError as exc:  # a damaged file: set aside, the list starts empty
            self.notify(str(exc), severity="error", timeout=15)
            chats = []
        for chat in chats:
            updated = time.strftime("%Y-%m-%d %H:%M", time.localtime(chat.updated))
            table.add_row(chat.title, chat.model, str(chat.messages), updated, key=str(chat.id))
        if not table.row_count:
            self._title("No saved chats yet. Esc closes.")
        table.focus()

    def _title(self, text: str) -> None:
        self.query_one(".dialog-title", Static).update(text)

    def _selected(self) -> int | None:
        table = self.query_one(DataTable)
        if not table.row_count:
            return None
        key, _ = table.coordinate_to_cell_key(table.cursor_coordinate)
        return int(key.value)

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        self.dismiss(int(event.row_key.value))

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        if self.armed is not None and event.row_key.value != str(self.armed):
            self.armed = None
            self._title(TITLE)

    def action_delete(self) -> None:
        chat_id = self._selected()
        if chat_id is None:
            return
        table = self.query_one(DataTable)
        if self.armed != chat_id:
            self.armed = chat_id
            title = table.get_row(str(chat_id))[0]
            self._title(f"Delete “{title}”? Press d again to delete it, or move away to keep it.")
            return
        self.armed = None
        try:
            self.store.delete_chat(chat_id)
        except SortedChatError as exc:
            self.notify(str(exc), severity="error", timeout=15)
            return
        table.remove_row(str(chat_id))
        self._title(TITLE if table.row_count else "No saved chats left. Esc closes.")
        self.post_message(self.Deleted(chat_id))
        self.notify("chat deleted")

    def action_export(self) -> None:
        chat_id = self._selected()
        if chat_id is None:
            return
        try:
            self.notify(f"exported to {self.export(chat_id)}")
        except (OSError, SortedChatError) as exc:
            self.notify(f"export failed: {exc}", severity="error", timeout=10)
