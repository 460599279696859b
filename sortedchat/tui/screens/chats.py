"""Saved chats: reopen one, delete it (asked twice), or export it to Markdown."""

from __future__ import annotations

import time
from pathlib import Path

from textual.binding import Binding
from textual.containers import Vertical
from textual.message import Message
from textual.screen import ModalScreen
from textual.widgets import DataTable, Static

from sortedchat import SortedChatError
from sortedchat.tui.storage import ChatStore

TITLE = "Saved chats  (Enter open · r rename · d delete · e export to Markdown · Esc close)"
UPDATED = "%Y-%m-%d %H:%M"


class ChatListScreen(ModalScreen[int | None]):
    """Dismisses with the id of the chat to open, or None. Posts `Deleted` for every chat it deletes."""

    BINDINGS = [
        Binding("escape", "dismiss(None)", "Close"),
        Binding("d,delete", "delete", "Delete"),
        Binding("e", "export", "Export to Markdown"),
        Binding("r", "rename", "Rename"),
    ]

    class Deleted(Message):
        def __init__(self, chat_id: int):
            super().__init__()
            self.chat_id = chat_id

    def __init__(self, store: ChatStore, export_dir: Path):
        super().__init__()
        self.store = store
        self.export_dir = export_dir  # where exports go
        self.armed: int | None = None  # the chat the next `d` deletes

    def compose(self):
        with Vertical(id="chats"):
            yield Static(TITLE, classes="dialog-title")
            yield DataTable(cursor_type="row", zebra_stripes=True)

    def on_mount(self) -> None:
        table = self.query_one(DataTable)
        try:
            chats = self.store.chats()
        except SortedChatError as exc:  # a damaged file: set aside, the list starts empty
            self.notify(str(exc), severity="error", timeout=15)
            chats = []
        # The date and the count keep their full width; the title takes what is left, the model comes last.
        inner = min(96, self.app.size.width) - 8  # the dialog's border and padding, the scroll bar
        model = min(24, max([len("model"), *(len(c.model) for c in chats)]))
        table.add_column("chat", key="title", width=max(12, inner - 16 - 8 - model - 8))
        table.add_column("messages", width=8)
        table.add_column("updated", width=16)
        table.add_column("model", width=model)
        for chat, title in zip(chats, numbered_titles(chats)):
            updated = time.strftime(UPDATED, time.localtime(chat.updated))
            table.add_row(title, str(chat.messages), updated, chat.model, key=str(chat.id))
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

    def action_rename(self) -> None:
        from sortedchat.tui.screens.rename import RenameScreen

        chat_id = self._selected()
        if chat_id is None:
            return

        def renamed(title: str | None) -> None:
            if title is None:
                return
            try:
                self.store.rename_chat(chat_id, title)
            except SortedChatError as exc:
                self.notify(str(exc), severity="error", timeout=15)
                return
            self.query_one(DataTable).update_cell(str(chat_id), "title", title)

        self.app.push_screen(RenameScreen(self.store.load(chat_id).title), renamed)

    def action_export(self) -> None:
        chat_id = self._selected()
        if chat_id is None:
            return
        try:
            self.notify(f"exported to {self.store.export_to(chat_id, self.export_dir)}")
        except (OSError, SortedChatError) as exc:
            self.notify(f"export failed: {exc}", severity="error", timeout=10)


def numbered_titles(chats) -> list[str]:
    """Titles as listed; chats that share a title are told apart by " (2)", " (3)"… in the order they were made."""
    seen: dict[str, int] = {}
    number = {}
    for chat in sorted(chats, key=lambda c: c.id):
        seen[chat.title] = seen.get(chat.title, 0) + 1
        number[chat.id] = seen[chat.title]
    return [c.title if seen[c.title] == 1 else f"{c.title} ({number[c.id]})" for c in chats]
