"""Saved chats: reopen one, delete it (asked twice), or export it to Markdown.

The columns are sized to the terminal: the date and the message count keep their width, the title takes what
is left once the model's name has its share, and a title cut short keeps the " (2)" that tells it from a chat
of the same name. The keys are in the dialog's own footer.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

from textual.binding import Binding
from textual.containers import Vertical
from textual.message import Message
from textual.screen import ModalScreen
from textual.widgets import DataTable, Footer, Static

from sortedchat import SortedChatError
from sortedchat.tui.storage import ChatStore

TITLE = "Saved chats"
UPDATED = "%Y-%m-%d %H:%M"
DIALOG_WIDTH = 96  # app.tcss: #chats, within a thick border and one column of padding each side
VISIBLE_ROWS = 20  # app.tcss: the table's max-height; more rows bring a scroll bar
FIXED = {"messages": 8, "updated": len("2026-12-01 23:38")}
NUMBERED = re.compile(r" \(\d+\)$")  # what `numbered_titles` adds


class ChatListScreen(ModalScreen[int | None]):
    """Dismisses with the id of the chat to open, or None. Posts `Deleted` for every chat it deletes."""

    BINDINGS = [
        Binding("enter", "open", "Open", priority=True),  # before the table's own Enter, so the footer shows it
        Binding("r", "rename", "Rename"),
        Binding("d,delete", "delete", "Delete", key_display="d"),
        Binding("e", "export", "Export to Markdown"),
        Binding("escape", "dismiss(None)", "Close"),
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
        self.titles: dict[int, str] = {}  # chat id -> its whole title as listed, numbered where titles repeat

    def compose(self):
        with Vertical(id="chats"):
            yield Static(TITLE, classes="dialog-title")
            yield DataTable(cursor_type="row", zebra_stripes=True)
        yield Footer()

    def on_mount(self) -> None:
        self.fill()
        if not self.query_one(DataTable).row_count:
            self._title("No saved chats yet. Esc closes.")
        self.query_one(DataTable).focus()

    def on_resize(self) -> None:
        if self.query_one(DataTable).row_count:
            self.fill()

    def fill(self) -> None:
        """(Re)list the saved chats in columns sized to the terminal; the cursor stays on the chat it was on."""
        table = self.query_one(DataTable)
        chosen = self._selected()
        try:
            chats = self.store.chats()
        except SortedChatError as exc:  # a damaged file: set aside, the list starts empty
            self.notify(str(exc), severity="error", timeout=15)
            chats = []
        self.titles = dict(zip((c.id for c in chats), numbered_titles(chats)))
        inner = min(DIALOG_WIDTH, self.app.size.width) - 4 - (2 if len(chats) > VISIBLE_ROWS else 0)
        title_width, model_width = column_widths(inner, list(self.titles.values()), [c.model for c in chats])
        table.clear(columns=True)
        table.add_column("chat", key="title", width=title_width)
        for label, width in FIXED.items():
            table.add_column(label, width=width)
        table.add_column("model", width=model_width)
        for chat in chats:
            updated = time.strftime(UPDATED, time.localtime(chat.updated))
            table.add_row(shorten(self.titles[chat.id], title_width), str(chat.messages), updated,
                          shorten(chat.model, model_width), key=str(chat.id))
        if chosen is not None and str(chosen) in table.rows:
            table.move_cursor(row=table.get_row_index(str(chosen)), animate=False)

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

    def action_open(self) -> None:
        chat_id = self._selected()
        if chat_id is not None:
            self.dismiss(chat_id)

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
            self._title(f"Delete “{self.titles[chat_id]}”? Press d again to delete it, or move away to keep it.")
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
            self.fill()  # its number among same-titled chats may change

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


def column_widths(inner: int, titles: list[str], models: list[str]) -> tuple[int, int]:
    """The title's and the model's column widths in `inner` cells (each column also takes one cell of padding
    each side). The model gets its longest name if the titles still fit, else up to a third of what the two
    share; the title gets the rest, so no space is left over."""
    free = inner - 2 * (len(FIXED) + 2) - sum(FIXED.values())
    title_need = max([len("chat"), *map(len, titles)])
    model_need = max([len("model"), *map(len, models)])
    model = model_need if title_need + model_need <= free else max(len("model"), min(model_need, free // 3))
    return max(len("chat"), free - model), model


def shorten(text: str, width: int) -> str:
    """`text` in `width` cells: cut with "…" at the end, or before a " (2)"-style number, which stays."""
    if len(text) <= width:
        return text
    number = NUMBERED.search(text)
    suffix = number.group(0) if number and len(number.group(0)) < width - 1 else ""
    return text[:width - 1 - len(suffix)].rstrip() + "…" + suffix

