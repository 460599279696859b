"""The chat app driven with Textual's Pilot on the tiny model: what the user does and what the screen shows."""

from __future__ import annotations

import asyncio
import threading

import pytest

from sortedchat.engine import Mode, ModeKind
from sortedchat.engine.context import encode_chat
from sortedchat.tui.app import SortedChatApp
from sortedchat.tui.screens.chat import ChatScreen
from sortedchat.tui.screens.chats import ChatListScreen
from sortedchat.tui.screens.loading import LoadingScreen
from sortedchat.tui.settings import Settings, load_settings
from sortedchat.tui.storage import ChatStore
from sortedchat.tui.widgets.answer import AnswerView, TokenText
from sortedchat.tui.widgets.conversation import UserMessage

from helpers.tui import (
    PROMPT,
    SIZE,
    Gate,
    ask,
    chat,
    dialogue,
    expected_answer,
    make_app,
    named,
    run_async,
    status,
    wait_for,
)


def test_a_message_is_sent_and_answered(tiny, tmp_path):
    app = make_app(tiny, tmp_path)

    @run_async
    async def run():
        async with app.run_test(size=SIZE) as pilot:
            await ask(pilot, app)
            assert [str(w.render()) for w in app.screen.query(UserMessage)] == [PROMPT]
            text, events = expected_answer(tiny, [{"role": "user", "content": PROMPT}])
            assert chat(app).answer.text == text and text
            assert [e.token_id for e in dialogue(app).events] == [e.token_id for e in events]
            assert chat(app).prompt.text == ""
            fill = (len(encode_chat(tiny, [{"role": "user", "content": PROMPT}])) + len(events)) / 512
            assert status(app).startswith(f"Depth 6/6 · {len(events)} tokens · mean exit 6.0/6 · compute saved 0% · "
                                          f"context {fill:.0%} · tiny · ")  # then the threads (next test)
            assert dialogue(app).history[-1] == {"role": "assistant", "content": text}


@pytest.fixture
def torch_threads():
    """Sets torch's thread count for one test (as `--threads` does), and restores it after."""
    import torch

    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def test_the_status_line_shows_the_threads_torch_runs_on(tiny, tmp_path, torch_threads):
    torch_threads(1)
    app = make_app(tiny, tmp_path, max_new_tokens=4)

    @run_async
    async def run():
        async with app.run_test(size=(80, 24)) as pilot:
            assert status(app) == "Depth 6/6 · ready · tiny · 1 thread"
            torch_threads(2)
            await ask(pilot, app)
            # at 80 columns the model's name goes and the figures shorten, and the threads stay
            assert status(app) == "Depth 6/6 · 4 tok · exit 6.0 · compute saved 0% · context 5% · 2 threads"


def test_depth_keys_change_the_depth_of_the_following_tokens(tiny, tmp_path):
    app = make_app(tiny, tmp_path, max_new_tokens=10)

    @run_async
    async def run():
        async with app.run_test(size=SIZE) as pilot:
            gate = Gate(dialogue(app).session, after=3)
            await gate.start(pilot, app)
            await pilot.press("f2")  # shallower: 6 -> 4, mid-answer
            assert "Depth 4/6" in status(app)
            gate.release.set()
            await wait_for(pilot, lambda: not dialogue(app).generating)
            assert [e.exit_layer for e in dialogue(app).events] == [6] * 4 + [4] * 6
            assert status(app).startswith("Depth 4/6 · 10 tokens · mean exit 4.8/6")

            await pilot.press("f2", "f2")  # 4 -> 2, then already at the shallowest exit
            assert status(app).startswith("Depth 2/6 · last answer: 10 tokens · mean exit 4.8/6")
            await ask(pilot, app, "Again")
            assert {e.exit_layer for e in dialogue(app).events} == {2}
            await pilot.press("f3")
            assert "Depth 4/6" in status(app) and dialogue(app).session.mode == Mode.fixed(4)


def test_auto_mode_toggle_and_thresholds(tiny, tmp_path):
    app = make_app(tiny, tmp_path)

    @run_async
    async def run():
        async with app.run_test(size=SIZE) as pilot:
            await pilot.press("f4")
            assert dialogue(app).session.mode.kind is ModeKind.AUTO and status(app).startswith("Auto · ")
            for _ in range(20):  # lower every threshold to 0: every token leaves at the first exit
                await pilot.press("f6")
            assert "Auto, thresholds -1.00" in status(app)  # every per-exit threshold shifted down to 0
            await ask(pilot, app)
            assert dialogue(app).events and {e.exit_layer for e in dialogue(app).events} == {2}
            assert "mean exit 2.0/6" in status(app)
            for _ in range(20):  # threshold 1: no early exit is ever confident enough
                await pilot.press("f7")
            await ask(pilot, app, "Again")
            assert {e.exit_layer for e in dialogue(app).events} == {6}
            await pilot.press("f4")
            assert dialogue(app).session.mode == Mode.fixed(6) and "Depth 6/6" in status(app)


def test_speculative_toggle_drafts_at_the_current_depth_and_matches_full_depth(tiny, tmp_path):
    app = make_app(tiny, tmp_path)

    @run_async
    async def run():
        async with app.run_test(size=SIZE) as pilot:
            await pilot.press("f2")  # depth 4
            await pilot.press("f5")  # speculative, drafting at depth 4
            assert dialogue(app).session.mode == Mode.speculative(4) and "Speculative 4" in status(app)
            await ask(pilot, app)
            full, _ = expected_answer(tiny, [{"role": "user", "content": PROMPT}])
            assert chat(app).answer.text == full  # greedy speculative output is the full model's
            d = dialogue(app)
            assert {e.exit_layer for e in d.events} <= {4, 6} and d.session.last_stats.drafted > 0
            assert "drafts accepted " in status(app)
            await pilot.press("f3")  # the draft depth stays below the last layer
            assert dialogue(app).session.mode == Mode.speculative(4)
            await pilot.press("f5")
            assert dialogue(app).session.mode == Mode.fixed(4)
            await pilot.press("f3", "f5")  # at full depth, speculative falls back to the default draft exit
            assert dialogue(app).session.mode == Mode.speculative(tiny.default_draft_exit)


def test_escape_stops_and_keeps_the_partial_answer(tiny, tmp_path):
    store = ChatStore(tmp_path / "chats.sqlite3")
    app = make_app(tiny, tmp_path, max_new_tokens=30, store=store)

    @run_async
    async def run():
        async with app.run_test(size=SIZE) as pilot:
            gate = Gate(dialogue(app).session, after=4)
            await gate.start(pilot, app)
            await pilot.press("escape")
            gate.release.set()
            await wait_for(pilot, lambda: not dialogue(app).generating)
            assert len(dialogue(app).events) == 5
            partial = "".join(e.text for e in dialogue(app).events)
            assert chat(app).answer.text == partial
            assert dialogue(app).history[-1] == {"role": "assistant", "content": partial}
            assert store.load(dialogue(app).chat_id).messages[-1].content == partial
            assert " · stopped · " in status(app)


def test_quitting_mid_answer_stops_the_engine_at_its_next_token(tiny, tmp_path):
    app = make_app(tiny, tmp_path, max_new_tokens=100)
    opened = []

    @run_async  # the app is gone while the engine is held after its third token
    async def run():
        async with app.run_test(size=SIZE) as pilot:
            opened.append((dialogue(app), Gate(dialogue(app).session, after=2)))
            await opened[0][1].start(pilot, app)
            await pilot.press("ctrl+q")

    d, gate = opened[0]
    gate.release.set()
    assert gate.finished.wait(20)
    assert len(d.store.load(d.chat_id).messages[-1].tokens) == 3  # not the 100 asked for


def test_keys_are_handled_while_the_model_generates(tiny, tmp_path):
    app = make_app(tiny, tmp_path, max_new_tokens=20)

    @run_async
    async def run():
        async with app.run_test(size=SIZE) as pilot:
            gate = Gate(dialogue(app).session, after=2)
            await gate.start(pilot, app)
            await pilot.press("f8")  # rendered Markdown view
            await pilot.press("f4")  # auto mode
            await pilot.press(*"next")  # typing the next message
            screen = chat(app)
            assert screen.dialogue.generating and screen.conversation.markdown and screen.answer.markdown_view.display
            assert dialogue(app).session.mode.kind is ModeKind.AUTO and chat(app).prompt.text == "next"
            await pilot.press("enter")  # refused while answering: the text stays
            assert chat(app).prompt.text == "next"
            gate.release.set()
            await wait_for(pilot, lambda: not dialogue(app).generating)
            assert len(app.screen.query(AnswerView)) == 1


def test_a_saved_chat_reopens_with_the_same_content(tiny, tmp_path):
    first = make_app(tiny, tmp_path)
    shown = {}

    def snapshot(app):
        return ([str(w.render()) for w in app.screen.query(UserMessage)],
                [(a.text, [(t.token_id, t.exit_layer) for t in a.tokens]) for a in app.screen.query(AnswerView)])

    async def chat_twice():
        async with first.run_test(size=SIZE) as pilot:
            await ask(pilot, first)
            await pilot.press("f2")
            await ask(pilot, first, "Tell me more")
            shown["before"] = snapshot(first)
            shown["history"] = list(dialogue(first).history)

    async def reopen():
        second = make_app(tiny, tmp_path)
        async with second.run_test(size=SIZE) as pilot:
            await pilot.press("ctrl+l")
            assert isinstance(second.screen, ChatListScreen)
            await pilot.press("enter")
            await wait_for(pilot, lambda: isinstance(second.screen, ChatScreen) and dialogue(second).chat_id)
            await pilot.pause()
            assert snapshot(second) == shown["before"]
            assert dialogue(second).history == shown["history"]
            await ask(pilot, second, "And then?")  # the reopened chat goes on
            assert len(second.store.load(dialogue(second).chat_id).messages) == 6

            await pilot.press("ctrl+s")
            exported = (tmp_path / second.store.export_name(dialogue(second).chat_id)).read_text()
            assert "## You\n\nHello there\n" in exported and "## You\n\nAnd then?\n" in exported

            await pilot.press("ctrl+l", "d", "d")  # asked twice
            assert second.store.chats() == []

    asyncio.run(chat_twice())
    asyncio.run(reopen())


def test_layer_lens_shows_one_row_per_exit_for_the_selected_token(tiny, tmp_path):
    app = make_app(tiny, tmp_path)

    @run_async
    async def run():
        async with app.run_test(size=SIZE) as pilot:
            await ask(pilot, app)
            await pilot.press("f9")  # focuses the answer and selects its last token
            await wait_for(pilot, lambda: len(chat(app).lens.query(".lens-row")) == 3)
            await pilot.press("home")
            await wait_for(pilot, lambda: "token 0 " in str(chat(app).lens.header.render()))
            await wait_for(pilot, lambda: len(chat(app).lens.query(".lens-row")) == 3 and not chat(app).lens.loading)
            rows = [str(w.render()) for w in chat(app).lens.query(".lens-row")]
            assert [int(r.split()[0]) for r in rows] == [2, 4, 6]
            assert "◀" in rows[2] and "◀" not in rows[0] + rows[1]  # token 0 left at exit 6
            from sortedchat.engine.context import encode_chat
            from sortedchat.tui.widgets.lens import show_piece

            preds = tiny.exit_top_predictions(encode_chat(tiny, [{"role": "user", "content": PROMPT}]), k=4)
            for row, e in zip(rows, (2, 4, 6)):
                tid, p = preds[e][0]
                assert f"{show_piece(tiny.tokenizer.decode([tid]))} {p:.0%}" in row
            # the chosen token (greedy at full depth) is the full exit's top prediction
            assert chat(app).answer.tokens[0].token_id == preds[6][0][0]

            view = chat(app).answer.depth_view
            await pilot.click(TokenText, offset=(0, 0))
            await pilot.pause()
            assert view.cursor == 0


def test_remapped_keys_from_the_settings(tiny, tmp_path):
    app = make_app(tiny, tmp_path, settings=Settings(keys={"deeper": "ctrl+up", "shallower": "ctrl+down"}))

    @run_async
    async def run():
        async with app.run_test(size=SIZE) as pilot:
            await pilot.press("f2")  # no longer bound
            assert dialogue(app).session.mode.label(6) == "Depth 6/6"
            await pilot.press("ctrl+down")
            assert dialogue(app).session.mode == Mode.fixed(4)
            await pilot.press("ctrl+up")
            assert dialogue(app).session.mode == Mode.fixed(6)


def test_settings_screen_checks_and_saves(tiny, tmp_path):
    app = make_app(tiny, tmp_path)

    @run_async
    async def run():
        async with app.run_test(size=SIZE) as pilot:
            await pilot.press("ctrl+o")
            screen = app.screen
            screen.query_one("#temperature").value = "hot"
            await pilot.press("ctrl+s")
            assert app.screen is screen
            assert "Temperature must be a number, got 'hot'" in str(screen.query_one("#settings-error").render())
            screen.query_one("#temperature").value = "0"
            screen.query_one("#max_new_tokens").value = "3"
            screen.query_one("#system_prompt").text = "Be brief."
            await pilot.press("ctrl+s")
            assert isinstance(app.screen, ChatScreen)
            saved = load_settings()
            assert saved.max_new_tokens == 3 and saved.system_prompt == "Be brief." and saved.seed is None
            await ask(pilot, app)
            assert len(dialogue(app).events) == 3
            assert dialogue(app).history[0] == {"role": "system", "content": "Be brief."}


def test_loading_screen_shows_progress_then_the_chat(tiny, tmp_path):
    release = threading.Event()

    def loader(progress):
        progress("converting the default model", 0.5)
        release.wait(20)
        return named(tiny)

    app = SortedChatApp(loader=loader, store=ChatStore(tmp_path / "c.sqlite3"), show_speed=False)

    @run_async
    async def run():
        async with app.run_test(size=SIZE) as pilot:
            await wait_for(pilot, lambda: isinstance(app.screen, LoadingScreen)
                           and "converting" in str(app.screen.query_one("#loading-stage").render()))
            assert app.screen.query_one("#loading-bar").percentage == pytest.approx(0.5)
            release.set()
            await wait_for(pilot, lambda: isinstance(app.screen, ChatScreen))


def test_a_failed_load_ends_the_app_with_the_reason(tmp_path):
    from sortedchat import SortedChatError

    def loader(progress):
        raise SortedChatError("--model nowhere: no such file or directory")

    app = SortedChatApp(loader=loader, store=ChatStore(tmp_path / "c.sqlite3"))

    @run_async
    async def run():
        async with app.run_test(size=SIZE) as pilot:
            await wait_for(pilot, lambda: app.error is not None)

    assert str(app.error) == "--model nowhere: no such file or directory" and app.return_code == 1


def test_answer_paragraphs_read_as_one_text_and_the_cursor_crosses_them():
    from textual.app import App

    from sortedchat.tui.storage import StoredToken

    pieces = [("Hello", 2), (" world.\n", 4), ("\n", 6), ("Next", 6), ("\x07 line", 2)]

    class Host(App):
        def compose(self):
            yield TokenText(6, 2)

    @run_async
    async def run():
        app = Host()
        async with app.run_test(size=(40, 10)) as pilot:
            view = app.query_one(TokenText)
            view.add(StoredToken(i, text, layer, 0.5) for i, (text, layer) in enumerate(pieces))
            await pilot.pause()
            lines = [line for block in view.blocks for line in block.render().plain.split("\n")]
            assert lines == ["Hello world.", "", "Next line"]  # as one text; the bell character is dropped
            assert view.size.height == 3 and view.plain == "Hello world.\n\nNext\x07 line"
            assert app.focused is view
            await pilot.press("end")
            assert view.cursor == 4
            await pilot.press("left", "left")
            assert view.cursor == 2
            await pilot.press("home")
            assert view.cursor == 0 and str(view.blocks[0].render().spans[-1].style) == "reverse"
            await pilot.click(TokenText, offset=(1, 2))  # "Next" on the third line
            assert view.cursor == 3


def test_command_palette_offers_the_chat_commands(tiny, tmp_path):
    app = make_app(tiny, tmp_path)

    @run_async
    async def run():
        async with app.run_test(size=SIZE) as pilot:
            titles = {c.title: c for c in app.get_system_commands(app.screen)}
            assert {"New chat", "Saved chats", "Export chat to Markdown", "Settings", "Keys and colours",
                    "Toggle auto mode", "Toggle speculative mode", "Layer lens", "Quit"} <= set(titles)
            titles["Toggle auto mode"].callback()
            await pilot.pause()
            assert dialogue(app).session.mode.kind is ModeKind.AUTO


def test_status_line_counts_tokens_the_pacer_decoded_at_full_depth():
    from sortedchat.engine import GenerationStats
    from sortedchat.tui.widgets.status import fit_parts, status_parts

    stats = GenerationStats(num_layers=6, tokens=10, drafted=4, accepted=2, verifications=2, paced=5, exit_sum=50,
                            decode_seconds=1.0, layer_evals=60)
    assert fit_parts(status_parts("m", "Speculative 2", stats)) == (
        "Speculative 2 · 10.0 tok/s · 10 tokens · mean exit 5.0/6 · drafts accepted 50% · 5 undrafted · "
        "compute saved 0% (exits skipped 17% of layers, but verifying the drafts ran the deeper layers) · m"
    )


def test_the_status_line_says_what_its_figures_belong_to_and_what_they_mean():
    from sortedchat.engine import GenerationStats
    from sortedchat.tui.widgets.status import fit_parts, status_parts

    auto = GenerationStats(num_layers=30, tokens=100, exit_sum=100 * 18, layer_evals=100 * 29, decode_seconds=10,
                           prefill_seconds=2, prefilled_tokens=200, prompt_tokens=300, context_limit=8192)
    assert fit_parts(status_parts("m", "Depth 24/30", auto, answer_mode="Auto", context=(auto.context_fill, 3))) == (
        "Depth 24/30 · last answer: 10.0 tok/s (prompt 100 tok/s) · 100 tokens · mean exit 18.0/30 · compute saved 3% "
        "(exits skipped 40% of layers, but most ran later for deeper tokens) · context 5% (turns 1–3 unseen) · m")
    assert fit_parts(status_parts("m", "Auto", auto, answer_mode="Auto"), 80) == (
        "Auto · 10.0 tok/s (prompt 100 tok/s) · 100 tok · exit 18.0 · compute saved 3%")  # the note goes first
    generating = fit_parts(status_parts("m", "Auto", auto, generating=True, answer_mode="Depth 6/6"))
    assert generating.startswith("Auto · 10.0 tok/s")
    assert fit_parts(status_parts("m", "Auto", None, generating=True, reading=(512, 6500))) == (
        "Auto · reading the prompt: 512/6,500 tokens · m")


def test_a_chat_that_outgrows_the_context_goes_on_and_the_screen_says_what_the_model_sees(tiny, tmp_path):
    app = make_app(tiny, tmp_path, max_new_tokens=12)
    long = "The quick brown fox jumps over the lazy dog. " * 3
    too_long = "word " * 600

    @run_async
    async def run():
        async with app.run_test(size=SIZE) as pilot:
            for i in range(1, 11):
                await ask(pilot, app, f"{i}. {long}")
                assert dialogue(app).events  # every message is answered
            d = dialogue(app)
            said = [n.message for n in app._notifications]
            [notice] = [m for m in said if m.startswith("The model no longer sees")]
            assert notice.startswith("The model no longer sees turns 1–") and notice.endswith(
                "The oldest turns keep dropping out as the chat goes on; ^n starts a new chat.")  # the app's key
            fill, unseen = d.context()
            assert unseen == d.fit.dropped_turns > 0
            assert f" · context {fill:.0%} (turns 1–{unseen} unseen) · " in status(app)
            saved = len(d.store.load(d.chat_id).messages)
            chat(app).prompt.text = too_long
            await pilot.press("enter")
            await wait_for(pilot, lambda: any("nothing was sent" in n.message for n in app._notifications))
            [refused] = [n.message for n in app._notifications if "nothing was sent" in n.message]
            assert refused.startswith("the message is ") and "the model's context holds 512 tokens" in refused
            assert chat(app).prompt.text == too_long and not d.generating  # the message waits, unsent and unsaved
            assert len(d.store.load(d.chat_id).messages) == saved
            await ask(pilot, app, "Hello")
            assert d.events and d.history[-2] == {"role": "user", "content": "Hello"}
