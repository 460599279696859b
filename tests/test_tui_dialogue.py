"""The conversation behind the chat screen, driven with no app: answers stream into the store, modes change
mid-answer, an answer stops, a chat starts anew, reopens, and takes back its last turn."""

from __future__ import annotations

import threading

from sortedchat.engine import ChatSession, Mode, SamplingConfig
from sortedchat.tui.dialogue import Dialogue
from sortedchat.tui.storage import ChatStore

from helpers.tui import PROMPT, Gate, expected_answer, named

USER = {"role": "user", "content": PROMPT}


def make_dialogue(tiny, tmp_path, mode: Mode | None = None) -> Dialogue:
    return Dialogue(ChatSession(named(tiny), mode), ChatStore(tmp_path / "chats.sqlite3"), "tiny")


def answer(d: Dialogue, text: str = PROMPT, max_new_tokens: int = 12, system_prompt: str = "") -> list[str]:
    """Send `text`, generate the whole answer on this thread and finish it; what went wrong."""
    sampling = SamplingConfig(max_new_tokens=max_new_tokens)
    assert d.send(text, system_prompt, sampling) == []
    d.generate(sampling)
    return d.finish()


def answer_held(d: Dialogue, after: int, act, max_new_tokens: int = 10) -> list[str]:
    """Send PROMPT and generate on a worker thread; `act()` runs while the engine waits after token `after`."""
    gate = Gate(d.session, after)
    d.send(PROMPT)
    worker = threading.Thread(target=d.generate, args=(SamplingConfig(max_new_tokens=max_new_tokens),))
    worker.start()
    assert gate.reached.wait(20)
    act()
    gate.release.set()
    worker.join(20)
    return d.finish()


def test_an_answer_streams_into_the_store_token_by_token(tiny, tmp_path):
    d = make_dialogue(tiny, tmp_path)
    text, events = expected_answer(tiny, [USER])
    d.send(PROMPT)
    assert d.generating and d.events == [] and d.stats is None
    d.generate(SamplingConfig(max_new_tokens=12))
    saved = d.store.load(d.chat_id).messages  # every token is saved before the answer is finished
    assert [(m.role, m.content) for m in saved] == [("user", PROMPT), ("assistant", text)]
    streamed = d.take_tokens()
    assert [e.token_id for e in streamed] == [e.token_id for e in events] and d.take_tokens() == []
    assert d.finish() == [] and not d.generating
    assert d.history == [USER, {"role": "assistant", "content": text}]
    assert d.events == streamed and d.stats.tokens == len(events)
    last = d.store.load(d.chat_id).messages[-1]
    assert last.mode == "Depth 6/6" and last.stats["tokens"] == len(events)
    assert [t.token_id for t in last.tokens] == [e.token_id for e in events]


def test_a_line_based_front_end_streams_on_its_own_thread(tiny, tmp_path):
    d = make_dialogue(tiny, tmp_path, Mode.fixed(4))
    d.send(PROMPT)
    saved_before_shown = []
    for ev in d.stream(SamplingConfig(max_new_tokens=6)):
        saved_before_shown.append(len(d.store.load(d.chat_id).messages[-1].tokens) == ev.index + 1)
    assert saved_before_shown == [True] * 6 and d.take_tokens() == []  # nothing queued for a UI thread
    assert d.finish() == [] and d.store.load(d.chat_id).messages[-1].content == d.history[-1]["content"]
    assert d.stats.tokens == 6 and {e.exit_layer for e in d.events} == {4}


def test_a_stream_left_mid_answer_finishes_with_what_came(tiny, tmp_path):
    d = make_dialogue(tiny, tmp_path)  # the line-based chat on Ctrl+C: it stops reading and closes the stream
    d.send(PROMPT)
    tokens = d.stream(SamplingConfig(max_new_tokens=30))
    came = [next(tokens).text for _ in range(3)]
    tokens.close()
    assert d.finish() == [] and d.stats.tokens == 3
    assert d.history[-1] == {"role": "assistant", "content": "".join(came)}
    saved = d.store.load(d.chat_id).messages[-1]
    assert saved.content == "".join(came) and len(saved.tokens) == 3 and saved.stats["tokens"] == 3


def test_a_mode_change_applies_to_the_next_token_and_is_saved(tiny, tmp_path):
    d = make_dialogue(tiny, tmp_path)
    changed = []

    def shallower():
        d.control.step(-1)
        changed.append(d.apply_mode())

    assert answer_held(d, after=3, act=shallower) == []
    assert changed == [True] and d.answer.modes == ["Depth 6/6", "Depth 4/6"]
    assert [e.exit_layer for e in d.events] == [6] * 4 + [4] * 6
    assert d.store.load(d.chat_id).messages[-1].mode == "Depth 6/6 → Depth 4/6"
    assert d.apply_mode() is False and d.session.mode == Mode.fixed(4)  # between answers: no answer to mark


def test_stop_keeps_the_partial_answer(tiny, tmp_path):
    d = make_dialogue(tiny, tmp_path)
    assert answer_held(d, after=4, act=d.stop, max_new_tokens=30) == []
    partial = "".join(e.text for e in d.events)
    assert len(d.events) == 5 and d.stats.stopped == "interrupted"
    assert d.history[-1] == {"role": "assistant", "content": partial}
    assert d.store.load(d.chat_id).messages[-1].content == partial


def test_a_new_chat_starts_empty_and_is_saved_apart(tiny, tmp_path):
    d = make_dialogue(tiny, tmp_path)
    answer(d, system_prompt="Be brief.")
    answer(d, "Again", system_prompt="Be brief.")
    first = d.chat_id
    assert [m["role"] for m in d.history] == ["system", "user", "assistant", "user", "assistant"]
    d.new_chat()
    assert (d.history, d.chat_id, d.events, d.stats) == ([], None, [], None)
    answer(d)
    text, _ = expected_answer(tiny, [USER])
    assert d.history == [USER, {"role": "assistant", "content": text}]  # no memory of the first chat
    assert sorted(c.id for c in d.store.chats()) == [first, d.chat_id] and d.chat_id != first


def test_a_reopened_chat_goes_on_and_takes_back_its_last_turn(tiny, tmp_path):
    d = make_dialogue(tiny, tmp_path)
    assert d.take_back_last_turn() is None  # nothing answered yet
    answer(d)
    answer(d, "Tell me more")
    history, chat_id = list(d.history), d.chat_id
    again = make_dialogue(tiny, tmp_path)
    chat = again.open(chat_id)
    assert again.history == history and [m.content for m in chat.messages] == [m["content"] for m in history]
    assert again.take_back_last_turn() == "Tell me more" and again.history == history[:2]
    assert len(again.store.load(chat_id).messages) == 2
    answer(again, "Tell me more")
    assert again.history == history  # greedy: the same answer again, in the same chat
    again.rename("Greetings")
    assert again.title() == "Greetings" and len(again.store.chats()) == 1


def test_a_chat_deleted_while_open_continues_as_a_new_one(tiny, tmp_path):
    d = make_dialogue(tiny, tmp_path)
    answer(d)
    d.store.delete_chat(d.chat_id)
    notes = d.send("Again")
    assert notes == ["chat 1 is no longer in chats.sqlite3; saving this conversation as a new chat"]
    d.generate(SamplingConfig(max_new_tokens=2))
    d.finish()
    [saved] = d.store.chats()
    assert [m.content for m in d.store.load(saved.id).messages][::2] == [PROMPT, "Again"]


def test_an_engine_error_is_reported_by_finish(tiny, tmp_path):
    d = make_dialogue(tiny, tmp_path)
    d.send(PROMPT)
    d.generate(SamplingConfig(temperature=-1))  # refused by the engine, after the message was saved
    [error] = d.finish()
    assert error == "--temperature must be a finite number >= 0, got -1"
    assert d.history[-1] == {"role": "assistant", "content": ""} and not d.generating
