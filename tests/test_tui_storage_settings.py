"""The chat app's files: chats in SQLite (saved token by token), settings in TOML, and the `chat` command."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from sortedchat import SortedChatError
from sortedchat.cli import app as cli_app
from sortedchat.engine import Mode, ModeKind
from sortedchat.tui.depth import DepthControl
from sortedchat.tui.settings import Settings, load_settings, save_settings, settings_path
from sortedchat.tui.storage import ChatStore

from helpers.tui import run_async


def test_tokens_are_committed_as_they_come_and_an_unfinished_answer_is_rebuilt(tmp_path):
    store = ChatStore(tmp_path / "chats.sqlite3")
    chat = store.new_chat("Capital?", "tiny")
    _, answer = store.start_answer(chat, [{"role": "user", "content": "What is the capital of France?"}], "Depth 4/6",
                                   "tiny")
    for i, (piece, layer) in enumerate([("Par", 2), ("is", 4), (".", 6)]):
        store.add_token(answer, i, 100 + i, piece, layer, 0.5)
    # a second connection sees every token without any close or finish: nothing waits in memory
    other = ChatStore(tmp_path / "chats.sqlite3")
    loaded = other.load(chat)
    assert loaded.conversation() == [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
    ]
    assert [(t.text, t.exit_layer) for t in loaded.messages[1].tokens] == [("Par", 2), ("is", 4), (".", 6)]

    store.finish_message(answer, "Paris.", {"tokens": 3, "mean_exit": 4.0, "num_layers": 6})
    md = other.export_markdown(chat)
    assert md.startswith("# Capital?\n")
    assert "## You\n\nWhat is the capital of France?\n" in md
    assert "## Assistant (Depth 4/6 · 3 tokens · mean exit 4.0/6)\n\nParis.\n" in md
    assert [c.title for c in other.chats()] == ["Capital?"] and other.chats()[0].messages == 2
    other.delete_chat(chat)
    assert store.chats() == []
    with pytest.raises(SortedChatError, match="no chat"):
        store.load(chat)


def test_a_history_file_deleted_mid_answer_is_started_again_with_the_open_chat_in_it(tmp_path):
    """The file is deleted while an answer streams: its tokens went into the deleted file, through the open
    connection; finishing the answer starts a new file at the path holding that chat, tokens and all, and says so."""
    from sortedchat.tui.storage import HistoryGone

    path = tmp_path / "chats.sqlite3"
    store = ChatStore(path)
    other = store.new_chat("other", "tiny")
    chat = store.new_chat("Hi", "tiny")
    _, answer = store.start_answer(chat, [{"role": "user", "content": "Hi"}], "", "tiny")
    store.add_token(answer, 0, 10, "Hel", 6, 0.9)
    for part in tmp_path.glob("chats.sqlite3*"):  # `rm chats.sqlite3*` while the app runs
        part.unlink()
    store.add_token(answer, 1, 11, "lo", 4, 0.8)
    with pytest.raises(HistoryGone) as gone:
        store.finish_message(answer, "Hello")
    assert str(gone.value) == f"{path} was deleted while the app was open; a new chat history starts there; " \
                              "this chat is saved in it"
    fresh = ChatStore(path)  # what the next start of the app reads
    assert [c.id for c in fresh.chats()] == [chat]  # the open chat only: the deleted ones stay deleted
    loaded = fresh.load(chat)
    assert loaded.conversation() == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    assert [(t.text, t.exit_layer) for t in loaded.messages[1].tokens] == [("Hel", 6), ("lo", 4)]
    store.start_answer(chat, [{"role": "user", "content": "More"}], "", "tiny")  # the chat goes on in the new file
    assert [m.content for m in ChatStore(path).load(chat).messages] == ["Hi", "Hello", "More", ""]
    path.unlink()
    with pytest.raises(HistoryGone, match="was deleted while the app was open; a new chat history starts there$"):
        store.chats()
    assert store.chats() == [] and other not in [c.id for c in store.chats()]


def test_a_killed_app_loses_at_most_the_token_in_progress(tmp_path):
    """A child process writes tokens and is killed with SIGKILL mid-answer; every written token survives."""
    db = tmp_path / "chats.sqlite3"
    code = (
        "import os, sys\n"
        "from sortedchat.tui.storage import ChatStore\n"
        f"s = ChatStore(__import__('pathlib').Path({str(db)!r}))\n"
        "c = s.new_chat('t', 'm'); _, a = s.start_answer(c, [{'role': 'user', 'content': 'hi'}], '', 'm')\n"
        "for i in range(7): s.add_token(a, i, i, f'w{i} ', 6, 0.9)\n"
        "os.kill(os.getpid(), 9)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True)
    assert done.returncode == -9
    chat = ChatStore(db).load(1)
    assert chat.messages[-1].content == "w0 w1 w2 w3 w4 w5 w6 "


def test_settings_round_trip_and_keymap(tmp_path):
    settings = Settings(system_prompt="Be brief.", temperature=0.7, top_p=0.9, seed=3,
                        keys={"deeper": "ctrl+up", "view": "alt+m,f11", "stop": "escape"}, theme="textual-light")
    path = save_settings(settings)
    assert path == settings_path() and path.is_file()
    assert load_settings() == settings
    keymap = load_settings().keymap()
    assert keymap["deeper"] == "ctrl+up" and keymap["shallower"] == "f2"
    assert Settings().keymap()["send"] == "enter"


@pytest.mark.parametrize(
    "text, message",
    [
        ("[chat]\ntemperature = \n", "config.toml: Invalid value (at line 2, column 15)"),
        ("[chat]\nseed = 1\ntemperature = \"hot\"\n",
         "config.toml: line 3: [chat] temperature must be a number, got 'hot'"),
        ("[chat]\ntempreature = 0.5\n", "config.toml: line 2: [chat] tempreature is not a setting"),
        ("[keys]\nfaster = \"f5\"\n", "config.toml: line 2: [keys] faster is not an action"),
        ("[keys]\ndeeper = 5\n", "config.toml: line 2: [keys] deeper must be a key name"),
        ("[keys]\nshallower = \"f2\"\ndeeper = \"ctlr+up\"\n", "line 3: [keys] deeper must be a key name such as"),
        ("[look]\ncolour = 1\n", "config.toml: line 1: [look] is not a section"),
        ("[chat]\ntop_p = 1.5\n", "config.toml: line 2: [chat] top_p must be in (0, 1], got 1.5"),
    ],
)
def test_bad_config_names_file_line_and_key(text, message):
    settings_path().parent.mkdir(parents=True, exist_ok=True)
    settings_path().write_text(text)
    with pytest.raises(SortedChatError) as err:
        load_settings()
    assert str(err.value).startswith(str(settings_path().parent) + os.sep)
    assert message in str(err.value)


def test_bad_config_is_one_line_from_the_command_not_a_traceback():
    settings_path().parent.mkdir(parents=True, exist_ok=True)
    settings_path().write_text("[chat]\nmax_new_tokens = \"many\"\n")
    done = subprocess.run([sys.executable, "-m", "sortedchat"], capture_output=True, text=True, env=os.environ)
    assert done.returncode == 1
    assert done.stderr.strip() == (
        f"error: {settings_path()}: line 2: [chat] max_new_tokens must be a whole number, got 'many'"
    )


def test_bare_command_and_chat_open_the_app_with_the_given_options(tiny_dir, monkeypatch):
    """`sortedchat` and `sortedchat chat` take --model/--depth/... and the config file, and open the app."""
    from sortedchat.tui.app import SortedChatApp
    from sortedchat.tui.screens.chat import ChatScreen

    seen = []

    def run(self):
        @run_async
        async def drive():
            async with self.run_test(size=(100, 30)) as pilot:
                for _ in range(1000):
                    if isinstance(self.screen, ChatScreen) or self.error:
                        break
                    await pilot.pause(0.02)
                session = self.screen.dialogue.session if isinstance(self.screen, ChatScreen) else None
                seen.append((session and session.mode, self.settings, self.sm and self.sm.exits, self.error))

    monkeypatch.setattr(SortedChatApp, "run", run)
    save_settings(Settings(system_prompt="From the file.", max_new_tokens=99))
    runner = CliRunner()
    common = ["--model", str(tiny_dir), "--device", "cpu", "--exits", "2,4,6"]
    res = runner.invoke(cli_app, [*common, "--depth", "4", "-t", "0.5", "--top-p", "0.8"])
    assert res.exit_code == 0, res.output
    mode, settings, exits, error = seen[-1]
    assert (mode.kind, mode.depth, exits, error) == ("depth", 4, [2, 4, 6], None)
    assert (settings.temperature, settings.top_p, settings.max_new_tokens) == (0.5, 0.8, 99)
    assert settings.system_prompt == "From the file."

    res = runner.invoke(cli_app, ["chat", *common, "--speculative", "2", "--system", "Hi."])
    assert res.exit_code == 0, res.output
    mode, settings, _, _ = seen[-1]
    assert (mode.kind, mode.depth, settings.system_prompt, settings.temperature) == ("speculative", 2, "Hi.", 0.0)

    res = runner.invoke(cli_app, [*common, "--depth", "9"])
    assert isinstance(res.exception, SortedChatError) and "--depth 9: the model has 6 layers" in str(res.exception)


def test_plain_flag_still_runs_the_line_chat(tiny_dir, monkeypatch):
    import sortedchat.cli.chat as chat

    calls = []
    monkeypatch.setattr(chat, "plain_chat", lambda sm, mode, sampling, system: calls.append((mode, sampling, system)))
    res = CliRunner().invoke(cli_app, ["chat", "--plain", "--model", str(tiny_dir), "--device", "cpu", "--auto",
                                       "-n", "7", "--system", "Terse."])
    assert res.exit_code == 0, res.output
    mode, sampling, system = calls[0]
    assert mode.kind is ModeKind.AUTO and sampling.max_new_tokens == 7 and system == "Terse."


def test_depth_control_steps_over_the_exits():
    control = DepthControl(exits=[2, 4, 6], num_layers=6, default_draft=2, depth=6)
    assert control.step(+1) == "already at the deepest exit" and control.depth == 6
    control.step(-1)
    control.step(-1)
    assert control.label() == "Depth 2/6" and control.step(-1) == "already at the shallowest exit"
    control.toggle_auto()
    # the calibrated thresholds, shifted
    assert control.adjust_threshold(+1) is None and control.label() == "Auto, thresholds +0.05"
    assert control.mode().shift == 0.05 and control.mode().threshold is None
    control.settings = Mode.auto(0.9)  # a single --threshold moves itself instead
    assert control.adjust_threshold(-1) is None and control.label() == "Auto ≥0.85"
    control.step(+1)  # a depth key leaves auto mode for the next exit
    assert control.label() == "Depth 4/6"
    control.depth = 5  # a --depth that is not an exit steps to its neighbours
    control.step(-1)
    assert control.depth == 4


def test_depth_control_keeps_the_command_lines_drafting_options_across_mode_switches(tiny):
    control = DepthControl.for_model(tiny, Mode.speculative(4, draft_len=3, draft_stop=0.3, pace=False))
    control.toggle_speculative()  # off to depth 4, then auto, then speculative again at the next depth
    control.toggle_auto()
    control.step(-1)
    control.toggle_speculative()
    assert control.mode() == Mode.speculative(2, draft_len=3, draft_stop=0.3, pace=False)
