"""The chat file's schema version: an older file is brought up to date in one transaction, a newer one is refused
and left as it was."""

from __future__ import annotations

import sqlite3

import pytest

from sortedchat import SortedChatError
from sortedchat.tui import schema
from sortedchat.tui.storage import ChatStore


def version_0_file(path) -> None:
    """A chat file as sortedchat wrote it before files had a version: the base tables, one chat, WAL mode."""
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    for table in schema.BASE_TABLES:
        db.execute(table)
    db.execute("INSERT INTO chats VALUES (1, 'Capital?', 'tiny', 1.0, 2.0)")
    db.execute("INSERT INTO messages VALUES (1, 1, 'user', 'What is the capital of France?', '', NULL)")
    db.execute("INSERT INTO messages VALUES (2, 1, 'assistant', NULL, 'Depth 4/6', NULL)")  # never finished
    db.executemany("INSERT INTO tokens VALUES (2, ?, ?, ?, 6, 0.9)", [(0, 10, "Par"), (1, 11, "is")])
    db.close()


def file_state(path) -> tuple[int, set[str]]:
    """The file's schema version and the names of its indexes."""
    db = sqlite3.connect(path)
    try:
        version = db.execute("PRAGMA user_version").fetchone()[0]
        indexes = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    finally:
        db.close()
    return version, indexes


def test_a_version_0_file_is_upgraded_and_keeps_its_chats(tmp_path):
    path = tmp_path / "chats.sqlite3"
    version_0_file(path)
    assert file_state(path) == (0, {"sqlite_autoindex_tokens_1"})
    store = ChatStore(path)
    chat = store.load(1)
    assert (chat.title, chat.conversation()) == ("Capital?", [
        {"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": "Paris"}])
    assert store.notice is None
    store.close()
    assert file_state(path) == (len(schema.UPGRADES), {"sqlite_autoindex_tokens_1", "messages_by_chat"})
    again = ChatStore(path)  # an up-to-date file opens as it is
    assert [c.title for c in again.chats()] == ["Capital?"]


def test_a_new_file_starts_at_the_latest_version(tmp_path):
    ChatStore(tmp_path / "chats.sqlite3").close()
    assert file_state(tmp_path / "chats.sqlite3")[0] == len(schema.UPGRADES)


def test_a_failed_upgrade_leaves_the_file_as_it_was(tmp_path, monkeypatch):
    path = tmp_path / "chats.sqlite3"
    version_0_file(path)

    def broken(db):
        db.execute("ALTER TABLE no_such_table ADD COLUMN x TEXT")

    monkeypatch.setattr(schema, "UPGRADES", [*schema.UPGRADES, broken])
    with pytest.raises(SortedChatError, match="cannot open the chat history .no such table: no_such_table."):
        ChatStore(path)
    assert file_state(path) == (0, {"sqlite_autoindex_tokens_1"})  # the first upgrade was rolled back too
    assert not list(tmp_path.glob("*.damaged-*"))  # not mistaken for a damaged file


def test_a_file_from_a_newer_sortedchat_is_refused_untouched(tmp_path):
    path = tmp_path / "chats.sqlite3"
    store = ChatStore(path)
    store.new_chat("later", "tiny")
    store.close()
    db = sqlite3.connect(path)
    db.execute("PRAGMA user_version = 99")
    db.close()
    before = path.read_bytes()
    with pytest.raises(SortedChatError) as err:
        ChatStore(path)
    assert str(err.value) == (f"{path}: the chat history is from a newer sortedchat (schema version 99; this one "
                              f"reads up to {len(schema.UPGRADES)}); left untouched: update sortedchat to open it")
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["chats.sqlite3"]
