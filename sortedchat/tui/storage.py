"""Saved chats: one SQLite file under the user data dir, written while the answer is generated.

Every token is its own committed row, so killing the app loses at most the token being generated;
the text of an answer that never finished is rebuilt from its tokens. The file runs in WAL mode with
`synchronous=NORMAL`: a commit survives a crash or kill of the process without an fsync per token.
The generation thread writes tokens while the UI thread reads the chat list, so one lock serialises
access to the single connection. A write of several rows is one transaction, rolled back if any part
fails. A damaged file is never written to again: it is renamed aside (`chats.sqlite3.damaged-...`),
an empty history takes its place, and the error says so, so the user can go on. Opening a file brings its
tables up to date (`schema`).

A file deleted while the app is open would go on taking writes through the open connection, into a file no
longer there. Every use but a token's checks that the path still names the file that was opened; when it does
not, a new history starts there and the error says so (`HistoryGone`). Finishing an answer first copies its chat,
read from the deleted file, into the new one (the tokens of that answer went there); otherwise the chat is gone
from the store, and the dialogue saves the conversation as a new chat.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from sortedchat import SortedChatError
from sortedchat.config import atomic_write_text
from sortedchat.paths import data_dir
from sortedchat.tui import schema

DB_NAME = "chats.sqlite3"


@dataclass
class StoredToken:
    token_id: int
    text: str
    exit_layer: int
    confidence: float


@dataclass
class StoredMessage:
    id: int
    role: str
    content: str
    mode: str = ""
    stats: dict | None = None
    tokens: list[StoredToken] = field(default_factory=list)


@dataclass
class ChatSummary:
    id: int
    title: str
    model: str
    updated: float
    messages: int


@dataclass
class StoredChat:
    id: int
    title: str
    model: str
    created: float
    messages: list[StoredMessage]

    def conversation(self) -> list[dict]:
        """The chat-template messages, as the engine takes them."""
        return [{"role": m.role, "content": m.content} for m in self.messages]


class ChatGone(SortedChatError):
    """The chat was deleted (or its file set aside) while it was open."""


class HistoryGone(ChatGone):
    """The history file was deleted (or replaced) while it was open: a new one was started in its place."""


def _is_damage(exc: sqlite3.Error) -> bool:
    """SQLite says the file is corrupt or not a database at all (extended codes keep the low byte)."""
    return (getattr(exc, "sqlite_errorcode", 0) or 0) & 0xFF in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)


class ChatStore:
    """`notice` says what opening the file took (a damaged file set aside), for the app to show once."""

    def __init__(self, path: Path | None = None):
        self.path = path or data_dir() / DB_NAME
        self.lock = threading.Lock()
        self.notice: str | None = None
        try:
            self._connect()
        except sqlite3.DatabaseError as exc:
            if not _is_damage(exc):
                raise SortedChatError(f"{self.path}: cannot open the chat history ({exc})") from None
            self.notice = self._set_aside(exc)
        except OSError as exc:
            raise SortedChatError(f"{self.path}: cannot open the chat history ({exc})") from None

    def _connect(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        try:
            version = schema.checked_version(self.db, self.path)  # a newer file: refused before anything is written
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.execute("PRAGMA foreign_keys=ON")
            if version < len(schema.UPGRADES):  # an up-to-date file is not written to (a damaged one must not be)
                schema.bring_up_to_date(self.db, self.path)
        except (sqlite3.Error, SortedChatError):
            self.db.close()
            raise
        self.identity = self._file_identity()  # the file itself, which a deletion or replacement changes

    def _set_aside(self, exc: sqlite3.Error) -> str:
        """Rename the damaged file (and its WAL) aside, start an empty history; say what happened."""
        self.db.close()
        stamp, n = time.strftime("%Y%m%d-%H%M%S"), 1
        aside = self.path.with_name(f"{self.path.name}.damaged-{stamp}")
        while aside.exists():  # never over an earlier damaged copy
            n += 1
            aside = self.path.with_name(f"{self.path.name}.damaged-{stamp}-{n}")
        for suffix in ("", "-wal", "-shm"):
            part = self.path.with_name(self.path.name + suffix)
            if part.exists():
                part.rename(aside.with_name(aside.name + suffix))
        try:
            self._connect()
        except (OSError, sqlite3.Error) as again:
            raise SortedChatError(f"{self.path}: cannot start a new chat history ({again})") from None
        return f"{self.path}: the chat history is damaged ({exc}); kept it as {aside.name}, starting a fresh one"

    def _file_identity(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_dev, st.st_ino

    def _reopen_if_deleted(self, keep_message: int | None) -> str | None:
        """If the file was deleted (or replaced) since it was opened: a new history at the path, holding the chat
        of `keep_message` read from the deleted file; what happened, for the user. None when the file is there."""
        if self.identity is not None and self._file_identity() == self.identity:
            return None
        kept = self._read_chat_of(keep_message) if keep_message is not None else None
        self.db.close()  # the last connection to the deleted file: SQLite removes its -wal and -shm
        if not self.path.exists():
            for suffix in ("-wal", "-shm"):  # left by another process; they belong to the deleted file
                self.path.with_name(self.path.name + suffix).unlink(missing_ok=True)
        try:
            self._connect()
        except (OSError, sqlite3.Error) as again:
            raise SortedChatError(f"{self.path}: the chat history was deleted and cannot start again ({again})") \
                from None
        if kept:
            self.db.execute("BEGIN")
            for table, rows in kept.items():
                self.db.executemany(f"INSERT INTO {table} VALUES ({', '.join('?' * len(rows[0]))})", rows)
            self.db.execute("COMMIT")
        return (f"{self.path} was deleted while the app was open; a new chat history starts there"
                + ("; this chat is saved in it" if kept else ""))

    def _read_chat_of(self, message_id: int) -> dict[str, list[tuple]]:
        """The rows of the chat that holds `message_id`, per table (the open connection still reads a deleted
        file)."""
        row = self.db.execute("SELECT chat_id FROM messages WHERE id = ?", (message_id,)).fetchone()
        if row is None:
            return {}
        where = {"chats": "id = ?", "messages": "chat_id = ?",
                 "tokens": "message_id IN (SELECT id FROM messages WHERE chat_id = ?)"}
        rows = {table: self.db.execute(f"SELECT * FROM {table} WHERE {cond}", (row[0],)).fetchall()
                for table, cond in where.items()}
        return {table: found for table, found in rows.items() if found}

    @contextmanager
    def _use(self, write: bool = False, check: bool = True, keep_message: int | None = None
             ) -> Iterator[sqlite3.Connection]:
        """The connection, locked; with `write`, one transaction that a failure rolls back. With `check`, a file
        deleted since it was opened is noticed first (`HistoryGone`): before the work, or with `keep_message`
        after it, once that message's chat is in the new file."""
        with self.lock:
            gone = self._reopen_if_deleted(keep_message) if check else None
            if gone and keep_message is None:
                raise HistoryGone(gone)
            try:
                if write:
                    self.db.execute("BEGIN")
                try:
                    yield self.db
                except BaseException:
                    if write and self.db.in_transaction:
                        self.db.execute("ROLLBACK")
                    raise
                if write:
                    self.db.execute("COMMIT")
            except sqlite3.DatabaseError as exc:
                if _is_damage(exc):
                    raise SortedChatError(self._set_aside(exc)) from None
                raise SortedChatError(f"{self.path}: {exc}") from None
        if gone:
            raise HistoryGone(gone)

    def close(self) -> None:
        with self.lock:
            self.db.close()

    # -- writing ------------------------------------------------------------------------------------
    def new_chat(self, title: str, model: str) -> int:
        now = time.time()
        with self._use(write=True) as db:
            cur = db.execute(
                "INSERT INTO chats (title, model, created, updated) VALUES (?, ?, ?, ?)", (title, model, now, now)
            )
            return int(cur.lastrowid)

    def start_answer(self, chat_id: int | None, history: list[dict], mode: str, model: str) -> tuple[int, int]:
        """Save the last message of `history` (the user's) and an empty answer after it, in one transaction:
        (chat id, the answer's message id). With `chat_id` None a new chat holds the whole history."""
        with self._use(write=True) as db:
            if chat_id is None:
                first = next((m["content"] for m in history if m["role"] == "user"), "")
                now = time.time()
                chat_id = int(db.execute("INSERT INTO chats (title, model, created, updated) VALUES (?, ?, ?, ?)",
                                         ((first.splitlines() or [""])[0][:60], model, now, now)).lastrowid)
                saved = history
            else:
                saved = history[-1:]
            for m in saved:
                self._insert(db, chat_id, m["role"], m["content"])
            return chat_id, self._insert(db, chat_id, "assistant", None, mode)

    def _insert(self, db: sqlite3.Connection, chat_id: int, role: str, content: str | None, mode: str = "") -> int:
        if db.execute("SELECT 1 FROM chats WHERE id = ?", (chat_id,)).fetchone() is None:
            raise ChatGone(f"chat {chat_id} is no longer in {self.path.name}")
        cur = db.execute(
            "INSERT INTO messages (chat_id, role, content, mode) VALUES (?, ?, ?, ?)", (chat_id, role, content, mode)
        )
        db.execute("UPDATE chats SET updated = ? WHERE id = ?", (time.time(), chat_id))
        return int(cur.lastrowid)

    def add_token(self, message_id: int, index: int, token_id: int, text: str, exit_layer: int, confidence: float):
        """One token of an answer (not checked for a deleted file: `finish_message` is, and keeps them)."""
        with self._use(check=False) as db:
            db.execute(
                "INSERT OR REPLACE INTO tokens VALUES (?, ?, ?, ?, ?, ?)",
                (message_id, index, token_id, text, exit_layer, confidence),
            )

    def finish_message(self, message_id: int, content: str, stats: dict | None = None) -> None:
        with self._use(keep_message=message_id) as db:
            db.execute(
                "UPDATE messages SET content = ?, stats = ? WHERE id = ?",
                (content, json.dumps(stats) if stats is not None else None, message_id),
            )

    def delete_chat(self, chat_id: int) -> None:
        with self._use() as db:
            db.execute("DELETE FROM chats WHERE id = ?", (chat_id,))

    def rename_chat(self, chat_id: int, title: str) -> None:
        with self._use() as db:
            db.execute("UPDATE chats SET title = ? WHERE id = ?", (title, chat_id))

    def drop_last_turn(self, chat_id: int) -> None:
        """Drop the chat's last user message and everything after it (regenerating sends it again)."""
        with self._use(write=True) as db:
            db.execute("DELETE FROM messages WHERE chat_id = ? AND id >= "
                       "(SELECT MAX(id) FROM messages WHERE chat_id = ? AND role = 'user')", (chat_id, chat_id))

    def set_message_mode(self, message_id: int, mode: str) -> None:
        """The mode label of an answer whose mode changed while it was generated."""
        with self._use(keep_message=message_id) as db:
            db.execute("UPDATE messages SET mode = ? WHERE id = ?", (mode, message_id))

    def recent_prompts(self, limit: int = 500) -> list[str]:
        """The user's latest messages across all chats, oldest first (the message box's ↑ history)."""
        with self._use() as db:
            rows = db.execute(
                "SELECT content FROM messages WHERE role = 'user' ORDER BY id DESC LIMIT ?", (limit,)
            ).fetchall()
        return [content for (content,) in reversed(rows)]

    # -- reading ------------------------------------------------------------------------------------
    def chats(self) -> list[ChatSummary]:
        """Saved chats, most recently updated first."""
        with self._use() as db:
            rows = db.execute(
                "SELECT c.id, c.title, c.model, c.updated, COUNT(m.id) FROM chats c "
                "LEFT JOIN messages m ON m.chat_id = c.id GROUP BY c.id ORDER BY c.updated DESC, c.id DESC"
            ).fetchall()
        return [ChatSummary(*row) for row in rows]

    def load(self, chat_id: int) -> StoredChat:
        with self._use() as db:
            head = db.execute("SELECT id, title, model, created FROM chats WHERE id = ?", (chat_id,)).fetchone()
            if head is None:
                raise ChatGone(f"{self.path}: there is no chat {chat_id}")
            rows = db.execute(
                "SELECT id, role, content, mode, stats FROM messages WHERE chat_id = ? ORDER BY id", (chat_id,)
            ).fetchall()
            tokens: dict[int, list[StoredToken]] = {}
            for mid, token_id, text, exit_layer, conf in db.execute(
                "SELECT t.message_id, t.token_id, t.text, t.exit_layer, t.confidence FROM tokens t "
                "JOIN messages m ON m.id = t.message_id WHERE m.chat_id = ? ORDER BY t.message_id, t.idx",
                (chat_id,),
            ):
                tokens.setdefault(mid, []).append(StoredToken(token_id, text, exit_layer, conf))
        messages = []
        for mid, role, content, mode, stats in rows:
            toks = tokens.get(mid, [])
            if content is None:  # the app stopped while this answer was generated
                content = "".join(t.text for t in toks)
            messages.append(StoredMessage(mid, role, content, mode, json.loads(stats) if stats else None, toks))
        return StoredChat(head[0], head[1], head[2], head[3], messages)

    def export_name(self, chat_id: int) -> str:
        """A file name for the chat's export: ids come back after a delete, creation times do not."""
        with self._use() as db:
            row = db.execute("SELECT created FROM chats WHERE id = ?", (chat_id,)).fetchone()
        if row is None:
            raise ChatGone(f"chat {chat_id} is no longer in {self.path.name}")
        return f"sortedchat-{time.strftime('%Y%m%d-%H%M%S', time.localtime(row[0]))}-{chat_id}.md"

    def export_to(self, chat_id: int, folder: Path) -> Path:
        """Write the chat as Markdown into `folder`; the file's path."""
        return atomic_write_text(folder / self.export_name(chat_id), self.export_markdown(chat_id))

    def export_markdown(self, chat_id: int) -> str:
        """The chat as Markdown: a heading per turn, the mode and summary of each answer under it."""
        chat = self.load(chat_id)
        created = time.strftime("%Y-%m-%d %H:%M", time.localtime(chat.created))
        out = [f"# {chat.title}", "", f"*{chat.model} · {created}*"]
        for m in chat.messages:
            if m.role == "system":
                out += ["", "## System", "", m.content]
            elif m.role == "user":
                out += ["", "## You", "", m.content]
            else:
                note = [m.mode] if m.mode else []
                if m.stats:
                    note += [f"{m.stats['tokens']} tokens",
                             f"mean exit {m.stats['mean_exit']:.1f}/{m.stats['num_layers']}"]
                out += ["", "## Assistant" + (f" ({' · '.join(note)})" if note else ""), "", m.content]
        return "\n".join(out) + "\n"
