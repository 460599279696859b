"""One conversation with the model, apart from any screen: its messages, the mode, the answer being generated,
and what the chat store keeps of them.

The chat screen calls it and shows what it returns; tests drive it with no app at all. `send` checks that the
user's message fits in the model's context (`engine/context.py`: the oldest turns drop out of what the model
sees; a message too long on its own is refused before anything is saved), then saves it and an empty answer;
`stream` generates the answer, saving each token as it comes (one row per token,
so a kill loses at most one). The app runs `generate` on a worker thread: it queues the streamed tokens and
never touches a widget, and `take_tokens` hands the UI thread what arrived since its last call. `finish` saves
the answer's text and adds it to the messages.
`apply_mode` gives the session the mode the depth keys chose: the engine reads it before every token, so a
change applies to the next token even in the middle of an answer.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sortedchat import SortedChatError
from sortedchat.tui.depth import DepthControl, mode_range
from sortedchat.tui.storage import ChatStore, StoredChat

if TYPE_CHECKING:
    from sortedchat.engine import ChatSession, GenerationStats, SamplingConfig, TokenEvent
    from sortedchat.engine.context import ContextFit
    from sortedchat.engine.events import PrefillProgress


@dataclass
class Answer:
    """The answer being generated, or the last one: what it answers, the modes it was generated in, in order,
    and its tokens so far."""

    message_id: int
    context: list[dict]
    modes: list[str]
    events: list[TokenEvent] = field(default_factory=list)
    error: str | None = None


def dropped_turns_notice(fit: ContextFit, new_chat_hint: str) -> str:
    """What the user is told, once per chat, when the first turns drop out of what the model sees."""
    turns = "turn 1" if fit.dropped_turns == 1 else f"turns 1–{fit.dropped_turns}"
    return (f"The model no longer sees {turns} of this chat (its context holds {fit.limit} tokens); they stay saved. "
            f"The oldest turns keep dropping out as the chat goes on; {new_chat_hint}.")


class Dialogue:
    def __init__(self, session: ChatSession, store: ChatStore, model_name: str,
                 new_chat_hint: str = "a new chat starts afresh"):
        self.session, self.store, self.model_name = session, store, model_name
        self.new_chat_hint = new_chat_hint  # how this front end starts a new chat, for the dropped-turns notice
        self.control = DepthControl.for_model(session.sm, session.mode)
        self.history: list[dict] = []  # the conversation as the engine takes it
        self.chat_id: int | None = None  # None until the first message is saved
        self.answer: Answer | None = None
        self.fit: ContextFit | None = None  # what the model sees for the running (or last) answer
        self.prefill: tuple[int, int] | None = None  # how far the running answer's long prompt pass is
        self.generating = False
        self._pending: deque[TokenEvent] = deque()
        self._stop = threading.Event()

    @property
    def events(self) -> list[TokenEvent]:
        """The running (or last) answer's tokens so far."""
        return self.answer.events if self.answer else []

    @property
    def stats(self) -> GenerationStats | None:
        """The running (or last) answer's figures, once it has a token to show."""
        return self.session.last_stats if self.events else None

    # -- an answer, from the UI thread's side and the worker's ------------------------------------------
    def context(self) -> tuple[float, int] | None:
        """How full the model's context is (with the last answer, once it has tokens) and how many of the chat's
        first turns it no longer sees; None before the first message, or for a model that names no limit."""
        if self.fit is None or not self.fit.limit:
            return None
        stats = self.stats
        return (stats.context_fill if stats else self.fit.fill), self.fit.dropped_turns

    def send(self, text: str, system_prompt: str = "", sampling: SamplingConfig | None = None) -> list[str]:
        """Save `text` as the next user message and an empty answer after it, ready for `generate` with `sampling`
        (whose `max_new_tokens` sets the room kept for the answer). A message that cannot fit in the model's
        context is refused (`ContextFull`) with nothing saved. Returns what the user should be told: that the
        first turns dropped out of what the model sees (once per chat), and that the chat is no longer in the
        store (deleted elsewhere, or its file set aside), when a new chat then holds the whole conversation."""
        system = [{"role": "system", "content": system_prompt}] if self.chat_id is None and system_prompt else []
        messages = self.history + system + [{"role": "user", "content": text}]
        self.fit = self.session.fit(messages, sampling)
        self.history = messages
        notes = [dropped_turns_notice(self.fit, self.new_chat_hint)] if self.fit.first_drop else []
        label = self.control.label()
        try:
            self.chat_id, message_id = self.store.start_answer(self.chat_id, self.history, label, self.model_name)
        except SortedChatError as exc:
            notes.append(f"{exc}; saving this conversation as a new chat")
            self.chat_id, message_id = self.store.start_answer(None, self.history, label, self.model_name)
        self.answer = Answer(message_id, list(self.history), [label])
        self._pending.clear()
        self._stop.clear()
        self.prefill = None
        self.generating = True
        return notes

    def stream(self, sampling: SamplingConfig, on_prefill: PrefillProgress | None = None) -> Iterator[TokenEvent]:
        """Answer the message `send` saved, until the engine stops or `stop()` is called: each token is saved,
        then yielded; a long prompt pass reports to `on_prefill` first. An engine error ends the stream and is
        kept for `finish`."""
        answer = self.answer
        try:
            for ev in self.session.generate(answer.context, sampling, should_stop=self._stop.is_set,
                                            on_prefill=on_prefill):
                self.store.add_token(answer.message_id, ev.index, ev.token_id, ev.text, ev.exit_layer, ev.confidence)
                answer.events.append(ev)
                yield ev
        except SortedChatError as exc:
            answer.error = str(exc)

    def generate(self, sampling: SamplingConfig) -> None:
        """A worker thread's part: `stream` into the queue that `take_tokens` empties (and the prompt pass's
        progress into `prefill`)."""

        def progress(done: int, total: int) -> None:
            self.prefill = (done, total)

        for ev in self.stream(sampling, progress):
            self._pending.append(ev)

    def take_tokens(self) -> list[TokenEvent]:
        """The tokens `generate` queued since the last call, oldest first."""
        batch = []
        while self._pending:
            batch.append(self._pending.popleft())
        return batch

    def finish(self) -> list[str]:
        """Once the stream has ended: save the answer's text, figures and modes and add it to the messages.
        Returns what went wrong, for the user (the tokens are saved even when the rest could not be)."""
        self.generating = False
        answer, errors = self.answer, []
        content = "".join(e.text for e in answer.events)
        stats = self.stats
        try:
            self.store.finish_message(answer.message_id, content, stats.to_dict() if stats else None)
            if len(answer.modes) > 1:
                self.store.set_message_mode(answer.message_id, mode_range(answer.modes))
        except SortedChatError as exc:  # a damaged file was set aside
            errors.append(str(exc))
        self.history.append({"role": "assistant", "content": content})
        if answer.error:
            errors.append(answer.error)
        return errors

    def stop(self) -> None:
        """Let the running answer end at its next token."""
        self._stop.set()

    def apply_mode(self) -> bool:
        """Give the session the mode `control` now describes; True when that adds a mode to the running answer."""
        self.session.mode = self.control.mode()
        label = self.control.label()
        if self.generating and label != self.answer.modes[-1]:
            self.answer.modes.append(label)
            return True
        return False

    # -- the chat as a whole ------------------------------------------------------------------------
    def new_chat(self) -> None:
        """Start an empty conversation; the next message is saved as a new chat. Not while an answer is generated:
        the engine's state is reset."""
        self.history, self.chat_id, self.answer, self.fit = [], None, None, None
        self.session.reset()

    def open(self, chat_id: int) -> StoredChat:
        """Continue a saved chat; returns it, for the screen to show."""
        chat = self.store.load(chat_id)
        self.new_chat()
        self.chat_id = chat_id
        self.history = chat.conversation()
        return chat

    def take_back_last_turn(self) -> str | None:
        """Drop the last question and its answer, from the store and the messages, so the question can be sent
        again: returns the question, or None when no answer is there to take back."""
        if self.chat_id is None or len(self.history) < 2 or self.history[-1]["role"] != "assistant":
            return None
        self.store.drop_last_turn(self.chat_id)
        self.history.pop()
        return self.history.pop()["content"]

    def title(self) -> str:
        return self.store.load(self.chat_id).title

    def rename(self, title: str) -> None:
        self.store.rename_chat(self.chat_id, title)
