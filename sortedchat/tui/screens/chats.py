"""Saved chats: reopen one, delete it, or export it to Markdown."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import DataTable, Static

from sortedchat.tui.storage import ChatStore


class ChatListScreen(ModalScreen[int | None]):
    """Dismisses with the id of the chat to open, or None."""

    BINDINGS = [
        Binding("escape", "dismiss(None)", "Close"),
        Binding("d,delete", "delete", "Delete"),
        Binding("e", "export", "Export to Markdown"),
    ]

    def __init__(self, store: ChatStore, export: Callable[[int], Path]):
        super().__init__()
        self.store = store
        self.export = export

    def compose(self):
        with Vertical(id="chats"):
            yield Static("Saved chats  (Enter open · d delete · e export to Markdown · Esc close)",
                         classes="dialog-title")
            yield DataTable(cursor_type="row", zebra_stripes=True)

    def on_mount(self) -> None:
        table = self.query_one(DataTable)
        table.add_columns("chat", "model", "messages", "updated")
        for chat in self.store.chats():
            updated = time.strftime("%Y-%m-%d %H:%M", time.localtime(chat.updated))
            table.add_row(chat.title, chat.model, str(chat.messages), updated, key=str(chat.id))
        if not table.row_count:
            self.query_one(".dialog-title", Static).update("No saved chats yet. Esc closes.")
        table.focus()

    def _selected(self) -> int | None:
        table = self.query_one(DataTable)
        if not table.row_count:
            return None
        key, _ = table.coordinate_to_cell_key(table.cursor_coordinate)
        return int(key.value)

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        self.dismiss(int(event.row_key.value))

    def action_delete(self) -> None:
        chat_id = self._selected()
        if chat_id is None:
            return
        self.store.delete_chat(chat_id)
        self.query_one(DataTable).remove_row(str(chat_id))
        self.notify("chat deleted")

    def action_export(self) -> None:
        chat_id = self._selected()
        if chat_id is not None:
            self.notify(f"exported to {self.export(chat_id)}")
