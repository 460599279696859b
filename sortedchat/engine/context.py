"""What the model sees of a conversation that outgrows its context: the context policy of every front end.

When the next prompt and room for its answer do not fit in the model's context, the oldest turns drop out of
what the model sees; the system prompt and the new message always stay (the stored chat keeps everything; this
is only the model's view). A window that has to move drops enough turns to leave a quarter of the context free,
so that it moves again only every few turns: each move changes the prompt's start, which costs a re-prefill
of what follows the system prompt (the session's prefix reuse keeps the K/V up to the first difference), while
a window that stays put lets each turn reuse everything before it. A new message that cannot fit even alone is
refused (`ContextFull`) before anything is generated or stored.

The room kept for an answer is the answer's `max_new_tokens`, but at most a quarter of the context, so a long
`--max-new-tokens` never crowds out the conversation; the answer itself may still run on to the context's end
(`ContextFit.max_new_tokens`, what the engine caps it to).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

from sortedchat import SortedChatError
from sortedchat.sorted_model import SortedModel

ANSWER_SHARE = 4  # the room kept for an answer is at most 1/ANSWER_SHARE of the context
SLACK_SHARE = 4  # a moved window leaves 1/SLACK_SHARE of the context free for the turns after it


def encode_chat(sm: SortedModel, messages: list[dict]) -> list[int]:
    """Token ids of the conversation, ending with the assistant's generation prompt."""
    tok = sm.tokenizer
    if getattr(tok, "chat_template", None):
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    else:
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
    return tok(text, add_special_tokens=False)["input_ids"]


class ContextFull(SortedChatError):
    """The new message does not fit in the model's context even without any earlier turn."""

    def __init__(self, size: int, limit: int, reserve: int):
        super().__init__(f"the message is {size} tokens (with the system prompt and chat markup); the model's "
                         f"context holds {limit} tokens and keeps {reserve} of them for the answer, so at most "
                         f"{limit - reserve} fit")
        self.size, self.limit, self.reserve = size, limit, reserve


@dataclass(frozen=True)
class ContextFit:
    """The prompt the model gets for the next answer (`prompt`, the token ids of `messages`: the system prompt and
    the turns in the window), and where the conversation's window stands.

    `dropped_turns`: the first N user messages of the conversation (with their answers) are out of the model's
    view. `first_drop` is true for the one fit of a conversation at which turns first dropped out: the time
    to tell the user. `limit` is 0 for a model that names no context length."""

    messages: list[dict]
    prompt: list[int]
    limit: int
    dropped_turns: int
    max_new_tokens: int
    first_drop: bool = False

    @property
    def fill(self) -> float:
        """The share of the context the prompt takes (0 when the model names no limit)."""
        return len(self.prompt) / self.limit if self.limit else 0.0


class ContextWindow:
    """One conversation's window: how many of its messages (after the system prompt) the model no longer sees.
    It only moves forward, and only when the next prompt would not fit (module docstring)."""

    def __init__(self, sm: SortedModel):
        self.sm = sm
        self.reset()

    def reset(self) -> None:
        """A new conversation: the model sees all of it again, and has told nothing yet."""
        self.start = 0
        self.told = False

    def fit(self, messages: list[dict], max_new_tokens: int) -> ContextFit:
        """The prompt for answering the last message of `messages`, moving the window if it must.
        Raises `ContextFull` when the last message cannot fit at all (the window is then left as it was)."""
        system = messages[:1] if messages and messages[0]["role"] == "system" else []
        body = messages[len(system):]
        limit = self.sm.max_positions

        def prompt(start: int) -> list[int]:
            return encode_chat(self.sm, system + body[start:])

        if not limit:
            return ContextFit(messages, prompt(0), 0, 0, max_new_tokens)
        reserve = min(max_new_tokens, limit // ANSWER_SHARE)
        room = limit - reserve
        last_user = max((i for i, m in enumerate(body) if m["role"] == "user"), default=0)
        start = min(self.start, last_user)
        # Where the window may start: where it is, or at a later user message (a turn is a question and its answer).
        starts = [start] + [i for i, m in enumerate(body) if m["role"] == "user" and start < i <= last_user]
        ids = prompt(start)
        if len(ids) > room:
            alone = prompt(starts[-1])
            if len(alone) > room:
                raise ContextFull(len(alone), limit, reserve)
            target = room - limit // SLACK_SHARE
            at = bisect.bisect_left(starts, True, key=lambda s: len(prompt(s)) <= target)
            if at == len(starts):  # not even the message alone leaves the slack: keep as much as fits
                at = bisect.bisect_left(starts, True, key=lambda s: len(prompt(s)) <= room)
            start, ids = starts[at], prompt(starts[at])
        self.start = start
        dropped = sum(m["role"] == "user" for m in body[:start])
        first = bool(dropped) and not self.told
        self.told = self.told or first
        return ContextFit(system + body[start:], ids, limit, dropped, min(max_new_tokens, limit - len(ids)), first)
