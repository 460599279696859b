"""The chat file's tables, and how a file an earlier sortedchat wrote is brought up to date.

A file's schema version is SQLite's `user_version`: 0 is the tables as the first release wrote them (it set
no version). `UPGRADES[n]` takes a file from version n to n+1. Opening a file runs the upgrades it lacks in
one transaction, so a failure or a kill halfway leaves the file as it was; a fresh file is created as
version 0 and upgraded the same way, so every file takes one path. A file from a newer sortedchat is refused
before anything is written to it: its tables may mean something this version does not know.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from sortedchat import SortedChatError

# Version 0. Never edited: a change to the tables is a new upgrade below.
BASE_TABLES = [
    """CREATE TABLE IF NOT EXISTS chats (
        id INTEGER PRIMARY KEY,
        title TEXT NOT NULL,
        model TEXT NOT NULL,
        created REAL NOT NULL,
        updated REAL NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS messages (
        id INTEGER PRIMARY KEY,
        chat_id INTEGER NOT NULL REFERENCES chats(id) ON DELETE CASCADE,
        role TEXT NOT NULL,
        content TEXT,            -- NULL while an answer is being generated
        mode TEXT NOT NULL DEFAULT '',
        stats TEXT               -- JSON of the engine's GenerationStats
    )""",
    """CREATE TABLE IF NOT EXISTS tokens (
        message_id INTEGER NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
        idx INTEGER NOT NULL,
        token_id INTEGER NOT NULL,
        text TEXT NOT NULL,
        exit_layer INTEGER NOT NULL,
        confidence REAL NOT NULL,
        PRIMARY KEY (message_id, idx)
    )""",
]


def index_messages_by_chat(db: sqlite3.Connection) -> None:
    """0 -> 1: opening a chat, listing chats and deleting one look messages up by chat, which read the whole
    table (every message of every chat) without an index."""
    db.execute("CREATE INDEX IF NOT EXISTS messages_by_chat ON messages(chat_id)")


UPGRADES = [index_messages_by_chat]


def checked_version(db: sqlite3.Connection, path: Path) -> int:
    """The file's schema version, or an error when a newer sortedchat wrote it."""
    version = db.execute("PRAGMA user_version").fetchone()[0]
    if version > len(UPGRADES):
        raise SortedChatError(f"{path}: the chat history is from a newer sortedchat (schema version {version}; this "
                              f"one reads up to {len(UPGRADES)}); left untouched: update sortedchat to open it")
    return version


def bring_up_to_date(db: sqlite3.Connection, path: Path) -> None:
    """Create the tables of a new file and run the upgrades the file lacks, in one transaction. The version is
    read again under the write lock: of two processes opening one old file, the second finds it upgraded."""
    db.execute("BEGIN IMMEDIATE")
    try:
        version = checked_version(db, path)
        if version == 0:
            for table in BASE_TABLES:
                db.execute(table)
        for upgrade in UPGRADES[version:]:
            upgrade(db)
        db.execute(f"PRAGMA user_version = {len(UPGRADES)}")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")
