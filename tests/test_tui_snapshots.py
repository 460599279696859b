"""Screenshots of the chat app (pytest-textual-snapshot): answers in depth colours, help, settings, and the
same at 80x24 with the welcome, the layer lens (on a short and on a long answer), the light theme, the legend with
each exit's agreement, and the saved-chats list.

Deterministic by construction: fixed terminal size, greedy decoding, no tokens/s in the status line,
a fixed model name, thread count and config path. Update after an intended change with `pytest --snapshot-update`.
"""

from __future__ import annotations

import pytest

from sortedchat.engine import Mode
from sortedchat.tui.screens.chats import ChatListScreen
from sortedchat.tui.screens.help import HelpScreen
from sortedchat.tui.screens.settings import SettingsScreen
from sortedchat.tui.settings import Settings
from sortedchat.tui.storage import ChatStore

from helpers.tui import AGREEMENT, ask, chat, make_app, saved_answer, wait_for

SIZE = (100, 30)
pytestmark = pytest.mark.usefixtures("one_thread")  # the status line shows torch's thread count


async def steady_cursor(pilot):
    """A blinking cursor would make the picture depend on the moment it is taken."""
    for widget in pilot.app.screen.query("*"):
        if hasattr(widget, "cursor_blink"):
            widget.cursor_blink = False
    await pilot.pause()


@pytest.fixture(autouse=True)
def fixed_config_dir(monkeypatch):
    monkeypatch.setenv("SORTEDCHAT_CONFIG_DIR", "/home/user/.config/sortedchat")


def test_main_screen_with_answers_at_two_depths(snap_compare, tiny, tmp_path):
    app = make_app(tiny, tmp_path, max_new_tokens=24, mode=Mode.fixed(2))

    async def chat(pilot):
        await steady_cursor(pilot)
        await ask(pilot, app, "Hello there")
        await pilot.press("f3", "f3")  # full depth for the second answer
        await ask(pilot, app, "What is the capital of France?")
        await steady_cursor(pilot)

    assert snap_compare(app, terminal_size=SIZE, run_before=chat)


def opens(key, screen_type):
    """A `run_before` that presses `key` and waits for the dialog it opens."""

    async def run(pilot):
        await steady_cursor(pilot)
        await pilot.press(key)
        await wait_for(pilot, lambda: isinstance(pilot.app.screen, screen_type))
        await steady_cursor(pilot)

    return run


@pytest.mark.parametrize("size", [SIZE, (80, 24)], ids=["100x30", "80x24"])
@pytest.mark.parametrize("key, screen_type", [("f1", HelpScreen), ("ctrl+o", SettingsScreen)], ids=["help", "settings"])
def test_dialog(snap_compare, tiny, tmp_path, key, screen_type, size):
    assert snap_compare(make_app(tiny, tmp_path), terminal_size=size, run_before=opens(key, screen_type))


# 80x24: the smallest common terminal. Every part must fit: the legend names every exit and full depth,
# the status line keeps its mode, the footer keeps Help, New, Chats and Quit, the lens goes under the chat.
SMALL = (80, 24)


def test_small_empty_chat_shows_the_welcome(snap_compare, tiny, tmp_path):
    app = make_app(tiny, tmp_path)
    assert snap_compare(app, terminal_size=SMALL, run_before=steady_cursor)


def test_small_main_screen_with_a_speculative_answer(snap_compare, tiny, tmp_path):
    app = make_app(tiny, tmp_path, max_new_tokens=24, mode=Mode.speculative(2, pace=False))

    async def chat(pilot):
        await steady_cursor(pilot)
        await ask(pilot, app, "What is the capital of France?")
        await steady_cursor(pilot)

    assert snap_compare(app, terminal_size=SMALL, run_before=chat)


def test_small_layer_lens_under_the_chat(snap_compare, tiny, tmp_path):
    app = make_app(tiny, tmp_path)

    async def lens(pilot):
        await steady_cursor(pilot)
        await ask(pilot, app)
        await pilot.press("f9")
        await wait_for(pilot, lambda: len(chat(app).lens.query(".lens-row")) == 3 and not chat(app).lens.loading)
        await steady_cursor(pilot)

    assert snap_compare(app, terminal_size=SMALL, run_before=lens)


def test_small_light_theme(snap_compare, tiny, tmp_path):
    app = make_app(tiny, tmp_path, mode=Mode.fixed(2),
                   settings=Settings(max_new_tokens=24, theme="textual-light"))

    async def chat(pilot):
        await steady_cursor(pilot)
        await ask(pilot, app, "Hello there")
        await pilot.press("f3", "f3")
        await ask(pilot, app, "What is the capital of France?")
        await steady_cursor(pilot)

    assert snap_compare(app, terminal_size=SMALL, run_before=chat)


def test_small_legend_with_each_exits_agreement_after_a_depth_key(snap_compare, tiny, tmp_path):
    """Two rows of legend (exits over their agree%), and the notice F2 brings."""
    app = make_app(tiny, tmp_path, agreement=AGREEMENT)

    async def shallower(pilot):
        await steady_cursor(pilot)
        await pilot.press("f2")
        await steady_cursor(pilot)

    assert snap_compare(app, terminal_size=SMALL, run_before=shallower)


def test_small_saved_chats_list(snap_compare, tiny, tmp_path, monkeypatch):
    """Titles get the room; two chats of one long title keep their " (1)" and " (2)"; the dialog's keys below."""
    import time

    monkeypatch.setenv("TZ", "UTC")  # the list shows local time
    time.tzset()
    store = ChatStore(tmp_path / "chats.sqlite3")
    for title in ["What is the capital of France, and why is it there?"] * 2 + ["Hello there"]:
        _, answer = store.start_answer(None, [{"role": "user", "content": title}], "Depth 6/6",
                                       "SmolLM2-135M-Instruct (default)")
        store.finish_message(answer, "Hi")
    store.db.execute("UPDATE chats SET updated = 1798761600")  # a fixed date: the list shows it
    app = make_app(tiny, tmp_path, store=store)

    async def chats(pilot):
        await steady_cursor(pilot)
        await pilot.press("ctrl+l")
        await wait_for(pilot, lambda: isinstance(pilot.app.screen, ChatListScreen))
        await steady_cursor(pilot)

    try:
        assert snap_compare(app, terminal_size=SMALL, run_before=chats)
    finally:
        monkeypatch.undo()
        time.tzset()


def test_small_layer_lens_on_a_long_answer_keeps_its_token_in_view(snap_compare, tiny, tmp_path):
    store = ChatStore(tmp_path / "chats.sqlite3")
    text = " ".join(["The quick brown fox jumps over the lazy dog."] * 16)
    chat_id = saved_answer(store, tiny.tokenizer, "Hello there", text, exit_layer=lambda i: 2 + 2 * (i % 3))
    app = make_app(tiny, tmp_path, store=store)

    async def lens(pilot):
        await steady_cursor(pilot)
        await chat(app).open_chat(chat_id)
        await pilot.pause(0.3)  # the opened chat's scroll to its end lands first: F9 racing it ends a row off
        await pilot.press("f9")
        await wait_for(pilot, lambda: len(chat(app).lens.query(".lens-row")) == 3 and not chat(app).lens.loading)
        await pilot.pause(0.2)
        await steady_cursor(pilot)

    assert snap_compare(app, terminal_size=SMALL, run_before=lens)

