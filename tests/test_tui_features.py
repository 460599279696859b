"""What oterm and elia users expect: rename a chat, regenerate, ↑/↓ history, highlighted code, copy an answer."""

from __future__ import annotations

import pytest

from sortedchat.engine import Mode
from sortedchat.tui.screens.chat import ChatScreen
from sortedchat.tui.screens.chats import ChatListScreen
from sortedchat.tui.screens.rename import RenameScreen
from sortedchat.tui.settings import Settings
from sortedchat.tui.storage import ChatStore
from sortedchat.tui.widgets.answer import AnswerView
from sortedchat.tui.widgets.code import CodeFence, guess_code_language
from sortedchat.tui.widgets.conversation import UserMessage

from helpers.tui import (
    PROMPT,
    SIZE,
    ask,
    chat,
    dialogue,
    expected_answer,
    make_app,
    named,
    run_async,
    saved_answer,
    wait_for,
)


def test_rename_the_open_chat_and_one_in_the_saved_list(tiny, tmp_path):
    app = make_app(tiny, tmp_path)

    @run_async
    async def run():
        async with app.run_test(size=SIZE) as pilot:
            await pilot.press("ctrl+t")  # nothing saved yet: says so
            assert not isinstance(app.screen, RenameScreen)
            await ask(pilot, app)
            await pilot.press("ctrl+t")
            await wait_for(pilot, lambda: isinstance(app.screen, RenameScreen))
            field = app.screen.query_one("#title")
            assert field.value == PROMPT
            field.value = ""
            await pilot.press(*"Greetings", "enter")
            await wait_for(pilot, lambda: isinstance(app.screen, ChatScreen))
            assert app.store.load(dialogue(app).chat_id).title == "Greetings"

            await pilot.press("ctrl+l")
            await wait_for(pilot, lambda: isinstance(app.screen, ChatListScreen))
            await pilot.press("r")
            await wait_for(pilot, lambda: isinstance(app.screen, RenameScreen))
            app.screen.query_one("#title").value = "  Renamed in the list  "
            await pilot.press("enter")
            await wait_for(pilot, lambda: isinstance(app.screen, ChatListScreen))
            await pilot.pause()
            from textual.widgets import DataTable

            assert app.screen.query_one(DataTable).get_row_at(0)[0] == "Renamed in the list"
            assert app.store.load(dialogue(app).chat_id).title == "Renamed in the list"
            await pilot.press("r")
            await wait_for(pilot, lambda: isinstance(app.screen, RenameScreen))
            await pilot.press("escape")  # cancelled: the title stays
            await wait_for(pilot, lambda: isinstance(app.screen, ChatListScreen))
            assert app.store.load(dialogue(app).chat_id).title == "Renamed in the list"


def test_regenerate_replaces_the_last_answer_in_the_current_mode(tiny, tmp_path):
    app = make_app(tiny, tmp_path)

    @run_async
    async def run():
        async with app.run_test(size=SIZE) as pilot:
            await pilot.press("ctrl+r")  # nothing to regenerate yet
            assert dialogue(app).chat_id is None
            await ask(pilot, app)
            await ask(pilot, app, "Tell me more")
            first_answer = chat(app).answer
            await pilot.press("f2", "f2")  # depth 2
            await pilot.press("ctrl+r")
            await wait_for(pilot, lambda: chat(app).answer is not first_answer and not dialogue(app).generating)
            users = [str(w.render()) for w in app.screen.query(UserMessage)]
            assert users == [PROMPT, "Tell me more"] and len(app.screen.query(AnswerView)) == 2
            assert {e.exit_layer for e in dialogue(app).events} == {2}
            context = dialogue(app).history[:3]
            text, _ = expected_answer(tiny, context, mode=Mode.fixed(2))
            assert chat(app).answer.text == text and dialogue(app).history[-1] == {"role": "assistant", "content": text}
            saved = app.store.load(dialogue(app).chat_id).messages
            assert [(m.role, m.content) for m in saved] == [(m["role"], m["content"]) for m in dialogue(app).history]
            assert saved[-1].mode == "Depth 2/6"


def test_up_and_down_walk_through_earlier_messages_across_launches(tiny, tmp_path):
    store_path = tmp_path / "chats.sqlite3"
    first = make_app(tiny, tmp_path, max_new_tokens=2, store=ChatStore(store_path))

    @run_async
    async def run_first():
        async with first.run_test(size=SIZE) as pilot:
            await ask(pilot, first, "first question")
            await ask(pilot, first, "second question\nin two lines")
            await pilot.press(*"draft")
            await pilot.press("up")  # on the only line: the newest earlier message
            assert chat(first).prompt.text == "second question\nin two lines"
            await pilot.press("up")  # now on its second line: up moves the cursor first
            assert chat(first).prompt.text == "second question\nin two lines"
            await pilot.press("up")
            assert chat(first).prompt.text == "first question"
            await pilot.press("up")  # the oldest stays
            assert chat(first).prompt.text == "first question"
            await pilot.press("down")
            assert chat(first).prompt.text == "second question\nin two lines"
            await pilot.press("down")
            assert chat(first).prompt.text == "draft"  # past the newest: what was being typed

    second = make_app(tiny, tmp_path, max_new_tokens=2, store=ChatStore(store_path))

    @run_async
    async def run_second():
        async with second.run_test(size=SIZE) as pilot:
            await pilot.press("up")
            assert chat(second).prompt.text == "second question\nin two lines"


@pytest.mark.parametrize("code, language", [
    ("def add(a, b):\n    return a + b\n\n# Example usage:\nprint(add(1, 2))", "python"),
    ("const x = () => { return 1; };\nconsole.log(x());", "javascript"),
    ('{"a": 1, "b": [true, null]}', "json"),
    ("#include <stdio.h>\nint main(void) { printf(\"hi\"); return 0; }", "c"),
    ("SELECT name FROM users WHERE id = 3;", "sql"),
    ("just some words here", ""),
])
def test_a_bare_code_fence_gets_a_language(code, language):
    assert guess_code_language(code) == language


def test_code_blocks_in_the_markdown_view_are_highlighted(tiny, tmp_path):
    """A fence without a language (what small models write) is highlighted as the code it holds."""
    store = ChatStore(tmp_path / "chats.sqlite3")
    code = "def add(a, b):\n    return a + b\n\nprint(add(1, 2))"
    answer = f"Here:\n```\n{code}\n```\n"
    chat_id = saved_answer(store, tiny.tokenizer, "code", answer, confidence=1.0)
    app = make_app(tiny, tmp_path, store=store)

    @run_async
    async def run():
        async with app.run_test(size=SIZE) as pilot:
            await chat(app).open_chat(chat_id)
            await pilot.press("f8")
            await wait_for(pilot, lambda: app.screen.query(CodeFence))
            fence = app.screen.query_one(CodeFence)
            assert fence.code == code
            styled = {str(span.style) for span in fence._highlighted_code.spans}
            keyword = next(str(s.style) for s in fence._highlighted_code.spans
                           if fence._highlighted_code.plain[s.start:s.end] == "def")
            assert len(styled) >= 3 and keyword != "$text"


def test_copy_the_last_answer_with_one_key(tiny, tmp_path):
    app = make_app(tiny, tmp_path)

    @run_async
    async def run():
        async with app.run_test(size=SIZE) as pilot:
            await pilot.press("f10")
            assert app.clipboard == ""
            await ask(pilot, app)
            await pilot.press("f10")
            assert app.clipboard == chat(app).answer.text and app.clipboard
            said = list(app._notifications)[-1].message
            assert said == (f"sent the last answer ({len(app.clipboard)} characters) to the terminal's clipboard "
                            "(OSC 52); if nothing was copied, your terminal ignores it: ^s saves the chat to a file")


SAME_AGAIN = "the same answer again; {fix} in settings (^o) or change the depth (f2/f3) for another"


@pytest.mark.parametrize("temperature, seed, note", [
    (0.0, None, "temperature is 0: " + SAME_AGAIN.format(fix="raise it")),
    (0.8, 7, "the seed is fixed (7): " + SAME_AGAIN.format(fix="clear it")),
    (0.8, None, None),
])
def test_regenerate_says_when_it_will_write_the_same_answer_again(tiny, tmp_path, temperature, seed, note):
    from sortedchat.tui.settings import Settings

    app = make_app(tiny, tmp_path, settings=Settings(max_new_tokens=6, temperature=temperature, seed=seed))

    def notes():
        return [n.message for n in app._notifications]

    @run_async
    async def run():
        async with app.run_test(size=SIZE) as pilot:
            await ask(pilot, app)
            first = chat(app).answer.text
            await pilot.press("ctrl+r")
            await wait_for(pilot, lambda: chat(app).answer.text and not dialogue(app).generating)
            assert (note in notes()) if note else not [n for n in notes() if "same answer again" in n]
            if note:
                assert chat(app).answer.text == first  # as the note says
            await pilot.press("f2")  # another depth: another answer, and nothing said
            before = len(notes())
            await pilot.press("ctrl+r")
            await wait_for(pilot, lambda: chat(app).answer.text and not dialogue(app).generating)
            assert not [n for n in notes()[before:] if "same answer again" in n]


def test_exports_and_screenshots_go_to_a_documented_folder_never_the_current_directory(tiny, tmp_path, monkeypatch):
    import platformdirs

    from sortedchat.paths import data_dir, exports_dir
    from sortedchat.tui.app import SortedChatApp

    documents = tmp_path / "Documents"
    monkeypatch.setattr(platformdirs, "user_documents_path", lambda: documents)
    assert exports_dir() == data_dir() / "exports"  # no Documents folder
    documents.mkdir()
    assert exports_dir() == documents / "sortedchat"
    monkeypatch.setenv("SORTEDCHAT_EXPORT_DIR", str(tmp_path / "mine"))
    assert exports_dir() == tmp_path / "mine"
    monkeypatch.delenv("SORTEDCHAT_EXPORT_DIR")

    here = tmp_path / "checkout"
    here.mkdir()
    monkeypatch.chdir(here)
    app = SortedChatApp(model=named(tiny), show_speed=False, settings=Settings(max_new_tokens=2),
                        store=ChatStore(tmp_path / "chats.sqlite3"))

    @run_async
    async def run():
        async with app.run_test(size=SIZE) as pilot:
            await ask(pilot, app)
            await pilot.press("ctrl+s")
            await pilot.pause()
            [exported] = (documents / "sortedchat").glob("*.md")
            assert f"exported to {exported}" in [n.message for n in app._notifications]
            app.action_screenshot(filename="shot.svg")
            said = f"Saved screenshot to {documents / 'sortedchat' / 'shot.svg'}"
            await wait_for(pilot, lambda: said in [n.message for n in app._notifications])
            assert "<svg" in (documents / "sortedchat" / "shot.svg").read_text()

    assert list(here.iterdir()) == []

