"""What a new user meets first: the loading screen at once, a warm first answer, a welcome in an empty chat."""

from __future__ import annotations

import subprocess
import sys
import threading

from sortedchat import SortedChatError
from sortedchat.tui.app import SortedChatApp
from sortedchat.tui.screens.chat import ChatScreen
from sortedchat.tui.screens.loading import LoadingScreen
from sortedchat.tui.settings import Settings
from sortedchat.tui.storage import ChatStore
from sortedchat.tui.widgets.conversation import Welcome

from helpers.tui import PROMPT, SIZE, ask, chat, expected_answer, make_app, named, run_async, wait_for

# Runs `sortedchat --model M` with the app's run() replaced: prints whether torch was imported by then.
PROBE = """
import sys
from sortedchat.tui.app import SortedChatApp

def run(self, *args, **kwargs):
    print("torch imported before the app ran:", "torch" in sys.modules)

SortedChatApp.run = run
from sortedchat.cli import main
sys.argv = ["sortedchat", "--model", sys.argv[1]]
main()
"""


def test_the_app_starts_before_torch_is_imported(tiny_dir):
    """The loading screen can only show at once if nothing before `App.run` imports torch (~4 s)."""
    res = subprocess.run([sys.executable, "-c", PROBE, str(tiny_dir)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "torch imported before the app ran: False"


def test_bad_sampling_values_are_refused_before_the_app_starts(tiny_dir):
    from typer.testing import CliRunner

    from sortedchat.cli import app as cli_app

    res = CliRunner().invoke(cli_app, ["--model", str(tiny_dir), "--top-p", "1.5"])
    assert res.exit_code == 1 and "--top-p must be in (0, 1], got 1.5" in str(res.exception)


def test_the_model_warms_up_behind_the_loading_screen(tiny_dir, tmp_path):
    """The head's copies (the first answer's one-time cost) exist before the chat shows, and the warm-up leaves
    nothing behind: the first answer is the one a fresh session gives."""
    from sortedchat.loading import LoadOptions, load_sorted_model

    sm = named(load_sorted_model(str(tiny_dir), LoadOptions(device="cpu", exits=[2, 4, 6])))
    stages, release = [], threading.Event()

    def loader(progress):
        release.wait(20)
        return sm

    app = SortedChatApp(loader=loader, store=ChatStore(tmp_path / "c.sqlite3"), show_speed=False,
                        settings=Settings(max_new_tokens=12))

    @run_async
    async def run():
        async with app.run_test(size=SIZE) as pilot:
            await wait_for(pilot, lambda: isinstance(app.screen, LoadingScreen))
            screen = app.screen
            inner = screen.set_progress
            screen.set_progress = lambda stage, fraction=None: (stages.append(stage), inner(stage, fraction))
            assert not sm.head_product._copies  # nothing has run the model yet
            release.set()
            await wait_for(pilot, lambda: isinstance(app.screen, ChatScreen))
            assert stages[-1] == "warming up" and sm.head_product._copies
            await ask(pilot, app)
            text, _ = expected_answer(sm, [{"role": "user", "content": PROMPT}])
            assert chat(app).answer.text == text


def welcome_text(app) -> str:
    found = app.screen.query(Welcome)
    if not found:
        return ""
    widget = found.first()
    lines = widget.render_lines(widget.region.reset_offset)
    return "\n".join("".join(seg.text for seg in line).rstrip() for line in lines)


def test_an_empty_chat_shows_a_welcome_with_the_main_keys(tiny, tmp_path):
    app = make_app(tiny, tmp_path, settings=Settings(max_new_tokens=4, keys={"regenerate": "ctrl+g"}))

    @run_async
    async def run():
        async with app.run_test(size=(80, 24)) as pilot:
            await pilot.pause()
            shown = welcome_text(app)
            assert "Type a message below; ⏎ sends it." in shown
            for key, what in [("f2", "shallower"), ("f4", "auto depth"), ("f9", "layer lens"),
                              ("^g", "regenerate"), ("^l", "saved chats"), ("f1", "every key")]:
                assert any(key in line and what in line for line in shown.splitlines()), (key, shown)
            assert all(len(line) <= 78 for line in shown.splitlines())  # fits 80 columns
            await ask(pilot, app)
            assert welcome_text(app) == ""
            await pilot.press("ctrl+n")
            await pilot.pause()
            assert "every key" in welcome_text(app)


def test_a_long_loading_stage_keeps_to_one_line_at_80_columns(tmp_path):
    """The first start's stages name the GGUF file and count its tensors: at 80x24 the line is cut, not wrapped."""
    release = threading.Event()
    stage = "dequantizing tensor 17/272 of SmolLM2-135M-Instruct.Q4_1.gguf into the cache (one-time conversion)"

    def loader(progress):
        progress(stage, 0.3)
        release.wait(20)
        raise SortedChatError("no model in this test")  # after the test: the app, closed, shows nothing

    app = SortedChatApp(loader=loader, store=ChatStore(tmp_path / "c.sqlite3"))

    @run_async
    async def run():
        async with app.run_test(size=(80, 24)) as pilot:
            await wait_for(pilot, lambda: isinstance(app.screen, LoadingScreen) and app.screen.stage[0] == stage)
            await pilot.pause()
            label = app.screen.query_one("#loading-stage")
            shown = "".join(seg.text for seg in label.render_lines(label.region.reset_offset)[0]).strip()
            assert label.region.height == 1 and shown.endswith("…") and stage.startswith(shown[:-1])
            release.set()
