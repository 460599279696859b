"""Driving the chat app with Textual's Pilot on the tiny model: build it, send a prompt, read the screen."""

from __future__ import annotations

import asyncio
import threading

from sortedchat.config import SortedConfig
from sortedchat.engine import ChatSession, SamplingConfig
from sortedchat.sorted_model import SortedModel
from sortedchat.tui.app import SortedChatApp
from sortedchat.tui.dialogue import Dialogue
from sortedchat.tui.screens.chat import ChatScreen
from sortedchat.tui.settings import Settings
from sortedchat.tui.storage import ChatStore

SIZE = (110, 34)


PROMPT = "Hello there"


AGREEMENT = {2: 0.312, 4: 0.655}  # exit -> agreement with full depth, as `sortedchat train` records it


def named(sm: SortedModel, agreement: dict[int, float] | None = None) -> SortedModel:
    """The shared tiny model under a fixed name (its directory name varies between runs); with `agreement`, as a
    checkpoint whose training measured each exit's agreement with full depth."""
    measured = {str(e): {"ce": 1.0, "agree": a} for e, a in (agreement or {}).items()}
    training = {"metrics": {"eval": measured}} if agreement else {}
    return SortedModel(sm.model, sm.tokenizer, SortedConfig(exits=list(sm.exits), training=training), source="tiny")


def saved_answer(store: ChatStore, tokenizer, question: str, text: str, exit_layer=lambda i: 6,
                 confidence: float = 0.5) -> int:
    """Save `question` and `text` as a finished answer, token by token (each token's exit layer from
    `exit_layer(index)`), as the app would have; returns the chat's id."""
    chat_id, message = store.start_answer(None, [{"role": "user", "content": question}], "Depth 6/6", "tiny")
    for i, tid in enumerate(tokenizer.encode(text, add_special_tokens=False)):
        store.add_token(message, i, tid, tokenizer.decode([tid]), exit_layer(i), confidence)
    store.finish_message(message, text)
    return chat_id


def make_app(tiny, tmp_path, max_new_tokens=12, agreement=None, **kwargs) -> SortedChatApp:
    kwargs.setdefault("settings", Settings(max_new_tokens=max_new_tokens))
    kwargs.setdefault("store", ChatStore(tmp_path / "chats.sqlite3"))
    return SortedChatApp(model=named(tiny, agreement), show_speed=False, export_dir=tmp_path, **kwargs)


def chat(app: SortedChatApp) -> ChatScreen:
    """The app's chat screen, once the model is loaded."""
    return app.get_screen("chat")


def dialogue(app: SortedChatApp) -> Dialogue:
    """The conversation the chat screen shows."""
    return chat(app).dialogue


def expected_answer(tiny, messages, max_new_tokens=12, mode=None):
    events = list(ChatSession(tiny, mode).generate(messages, SamplingConfig(max_new_tokens=max_new_tokens)))
    return "".join(e.text for e in events), events


def run_async(test_body):
    """Run an `async def` test body at once, as a decorator: `@run_async` over `async def run(): ...` stands for
    the body followed by `asyncio.run(run())` (what Textual's `run_test` needs around it)."""
    asyncio.run(test_body())
    return test_body


async def wait_for(pilot, condition, timeout=20.0):
    for _ in range(int(timeout / 0.02)):
        if condition():
            return
        await pilot.pause(0.02)
    raise AssertionError("timed out waiting for the app")


async def ask(pilot, app, text=PROMPT):
    """Send `text` and wait for the whole answer."""
    before = chat(app).answer
    chat(app).prompt.focus()
    chat(app).prompt.text = text
    await pilot.press("enter")
    await wait_for(pilot, lambda: chat(app).answer is not before and not dialogue(app).generating)


def status(app) -> str:
    return str(chat(app).status.render())


class Gate:
    """Holds `session`'s engine right after token `after` until released, so a test can act mid-answer;
    `finished` is set when the engine has ended the answer."""

    def __init__(self, session: ChatSession, after: int):
        self.reached, self.release, self.finished = threading.Event(), threading.Event(), threading.Event()
        inner = session.generate

        def generate(*args, **kwargs):
            for ev in inner(*args, **kwargs):
                yield ev
                if ev.index == after:
                    self.reached.set()
                    self.release.wait(20)
            self.finished.set()

        session.generate = generate

    async def start(self, pilot, app, text=PROMPT):
        chat(app).prompt.text = text
        await pilot.press("enter")
        await wait_for(pilot, self.reached.is_set)
