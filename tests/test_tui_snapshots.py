"""Screenshots of the chat app (pytest-textual-snapshot): answers in depth colours, help, settings, and the
same at 80x24 with the welcome, the layer lens and the light theme.

Deterministic by construction: fixed terminal size, greedy decoding, no tokens/s in the status line,
a fixed model name and config path. Update after an intended change with `pytest --snapshot-update`.
"""

from __future__ import annotations

import pytest
from helpers.tui import ask, chat, make_app, wait_for

from sortedchat.engine import Mode
from sortedchat.tui.screens.help import HelpScreen
from sortedchat.tui.screens.settings import SettingsScreen
from sortedchat.tui.settings import Settings

SIZE = (100, 30)


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
    app = make_app(tiny, tmp_path, max_new_tokens=24, initial_mode=lambda sm: Mode.fixed(2))

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
    app = make_app(tiny, tmp_path, max_new_tokens=24, initial_mode=lambda sm: Mode.speculative(2, pace=False))

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
    app = make_app(tiny, tmp_path, initial_mode=lambda sm: Mode.fixed(2),
                   settings=Settings(max_new_tokens=24, theme="textual-light"))

    async def chat(pilot):
        await steady_cursor(pilot)
        await ask(pilot, app, "Hello there")
        await pilot.press("f3", "f3")
        await ask(pilot, app, "What is the capital of France?")
        await steady_cursor(pilot)

    assert snap_compare(app, terminal_size=SMALL, run_before=chat)
