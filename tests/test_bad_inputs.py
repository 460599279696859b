"""The bad-input matrix: each fault that once ended in a traceback or lost work, one case per row.

Every case does what the user did and checks what they see (a one-line error naming what was wrong
and where, or a note in the app) and that nothing is lost (messages saved, files kept, results
written somewhere). The rows follow issue 13's list; `test_bad_input[NN-...]` runs one of them.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import sqlite3
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

from sortedchat import SortedChatError
from sortedchat.config import SortedConfig
from sortedchat.sorted_model import SortedModel
from sortedchat.tui.app import SortedChatApp
from sortedchat.tui.screens.chat import ChatScreen
from sortedchat.tui.screens.chats import ChatListScreen
from sortedchat.tui.settings import Settings
from sortedchat.tui.storage import ChatStore

SIZE = (110, 34)
CASES = {}


def case(name):
    def register(fn):
        CASES[name] = fn
        return fn

    return register


def cli(*args, stdin: bytes | None = None, env: dict | None = None):
    """`sortedchat ARGS` in a subprocess: bytes out, so invalid UTF-8 stays visible."""
    return subprocess.run([sys.executable, "-m", "sortedchat", *map(os.fsencode, map(str, args))], input=stdin,
                          capture_output=True, env={**os.environ, **(env or {})})


def one_error_line(res) -> str:
    """The single line a failed command printed on stderr."""
    assert res.returncode == 1, (res.returncode, res.stderr)
    [line] = res.stderr.decode().strip().splitlines()
    return line


def make_app(tiny, store, export_dir) -> SortedChatApp:
    sm = SortedModel(tiny.model, tiny.tokenizer, SortedConfig(exits=list(tiny.exits)), source="tiny")
    app = SortedChatApp(model=sm, settings=Settings(max_new_tokens=4), store=store, show_speed=False,
                        export_dir=export_dir)
    app.notes = []
    notify = app.notify

    def record(message, **kwargs):
        app.notes.append(str(message))
        return notify(message, **kwargs)

    app.notify = record
    return app


async def wait_for(pilot, condition, timeout=20.0):
    for _ in range(int(timeout / 0.02)):
        if condition():
            return
        await pilot.pause(0.02)
    raise AssertionError("timed out waiting for the app")


async def send(pilot, app, text):
    before = app.answer
    app.chat.prompt.focus()
    app.chat.prompt.text = text
    await pilot.press("enter")
    await wait_for(pilot, lambda: app.answer is not before and not app.generating)


def run_app(app, script):
    async def go():
        async with app.run_test(size=SIZE) as pilot:
            await script(pilot)
            assert app.is_running  # nothing above ended the app

    asyncio.run(go())


def damage(path: Path) -> bytes:
    """Overwrite 8 KB after the header page of a closed SQLite file (its header stays valid)."""
    data = bytearray(path.read_bytes())
    data[4096 : 4096 + 8192] = b"\xa5" * 8192
    path.write_bytes(bytes(data))
    return bytes(data)


def store_with_chats(path: Path, chats: int = 30) -> None:
    store = ChatStore(path)
    for i in range(chats):
        chat = store.new_chat(f"chat {i}", "tiny")
        store.add_message(chat, "user", "words " * 200)
    store.close()


# -- 1. deleting the open chat ---------------------------------------------------------------------
@case("01-delete-open-chat")
def _(tiny, tmp_path):
    store = ChatStore(tmp_path / "chats.sqlite3")
    app = make_app(tiny, store, tmp_path)

    async def script(pilot):
        await send(pilot, app, "Hello there")
        first = app.chat_id
        await pilot.press("ctrl+l", "d")
        assert [c.id for c in store.chats()] == [first]  # one `d` only asks
        await pilot.press("d", "escape")
        assert store.chats() == []
        await send(pilot, app, "Again")
        assert app.history[0] == {"role": "user", "content": "Again"}  # a new conversation
        [saved] = store.chats()
        assert [m.role for m in store.load(saved.id).messages] == ["user", "assistant"]
        assert store.load(saved.id).messages[0].content == "Again"

    run_app(app, script)


# -- 2. a damaged chat database ---------------------------------------------------------------------
def _damaged_store(tmp_path):
    path = tmp_path / "chats.sqlite3"
    store_with_chats(path)
    return path, damage(path)


def _kept_aside(path: Path, damaged: bytes) -> None:
    [aside] = path.parent.glob("chats.sqlite3.damaged-*[0-9]")
    assert aside.read_bytes() == damaged  # never written to


@case("02a-damaged-db-send")
def _(tiny, tmp_path):
    path, damaged = _damaged_store(tmp_path)
    store = ChatStore(path)
    app = make_app(tiny, store, tmp_path)

    async def script(pilot):
        await send(pilot, app, "Hello there")
        assert any("damaged" in n and "kept it as chats.sqlite3.damaged-" in n for n in app.notes), app.notes
        [saved] = store.chats()
        assert [m.content for m in store.load(saved.id).messages][0] == "Hello there"

    run_app(app, script)
    _kept_aside(path, damaged)


@case("02b-damaged-db-chat-list")
def _(tiny, tmp_path):
    path, damaged = _damaged_store(tmp_path)
    app = make_app(tiny, ChatStore(path), tmp_path)

    async def script(pilot):
        await pilot.press("ctrl+l")
        await wait_for(pilot, lambda: isinstance(app.screen, ChatListScreen))
        assert any("damaged" in n for n in app.notes), app.notes
        await pilot.press("escape")
        await send(pilot, app, "Hello there")
        assert len(app.store.chats()) == 1

    run_app(app, script)
    _kept_aside(path, damaged)


# -- 4. export from the saved-chats screen ----------------------------------------------------------
@case("04a-export-target-is-a-directory")
def _(tiny, tmp_path):
    app = make_app(tiny, ChatStore(tmp_path / "chats.sqlite3"), tmp_path)

    async def script(pilot):
        await send(pilot, app, "Hello there")
        (tmp_path / app.store.export_name(app.chat_id)).mkdir()
        await pilot.press("ctrl+l", "e")
        assert any(n.startswith("export failed: ") and "Is a directory" in n for n in app.notes), app.notes
        assert isinstance(app.screen, ChatListScreen)

    run_app(app, script)


@case("04b-export-names-survive-reused-ids")
def _(tmp_path):
    store = ChatStore(tmp_path / "chats.sqlite3")
    first = store.new_chat("first", "tiny")
    name = store.export_name(first)
    store.delete_chat(first)
    time.sleep(1.1)  # export names count seconds
    second = store.new_chat("second", "tiny")
    assert second == first  # SQLite hands the id out again
    assert store.export_name(second) != name


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(name, request):
    fn = CASES[name]
    fn(**{p: request.getfixturevalue(p) for p in inspect.signature(fn).parameters})
