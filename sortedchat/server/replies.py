"""The OpenAI objects a chat completion answers with, plus what only a sorted model can tell: the layer each
token left at (`exit_layer` per streamed chunk, `exit_layers` in a whole answer; `drafted` in speculative mode),
and, in `usage`, the mean exit and the share of layer compute saved."""

from __future__ import annotations

import time
import uuid

from sortedchat.engine.events import GenerationStats, TokenEvent
from sortedchat.engine.modes import ModeKind
from sortedchat.server.requests import ChatRequest

FINISH = {"eos": "stop", "max_tokens": "length", "context": "length"}  # GenerationStats.stopped -> finish_reason


def usage(stats: GenerationStats) -> dict:
    return {
        "prompt_tokens": stats.prompt_tokens,
        "completion_tokens": stats.tokens,
        "total_tokens": stats.prompt_tokens + stats.tokens,
        "prompt_tokens_details": {"cached_tokens": stats.reused_tokens},  # prompt K/V reused from an earlier request
        "mean_exit": stats.mean_exit,
        "layer_compute_saved": stats.compute_saved,
        "num_layers": stats.num_layers,
    }


class Reply:
    """One request's answer as it comes: `chunk` per token when streamed, `completion` at the end otherwise."""

    def __init__(self, model_id: str, request: ChatRequest):
        self.model_id, self.request = model_id, request
        self.id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.speculative = request.mode.kind is ModeKind.SPECULATIVE
        self.events: list[TokenEvent] = []

    def _object(self, kind: str, **fields) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model_id, **fields}

    def _choice(self, payload: dict, finish: str | None, **extra) -> dict:
        return {"index": 0, **payload, "logprobs": None, "finish_reason": finish, **extra}

    def opening(self) -> dict:
        """The first chunk of a stream: the role, before any token."""
        return self._object("chat.completion.chunk", choices=[self._choice({"delta": {"role": "assistant",
                                                                                   "content": ""}}, None)])

    def chunk(self, ev: TokenEvent) -> dict:
        """One token: its text (empty while a character is incomplete, and for the end-of-turn token)."""
        self.events.append(ev)
        extra = {"exit_layer": ev.exit_layer} | ({"drafted": ev.drafted} if self.speculative else {})
        return self._object("chat.completion.chunk", choices=[self._choice({"delta": {"content": ev.text}}, None,
                                                                           **extra)])

    def closing(self, stats: GenerationStats) -> list[dict]:
        """The chunk with the finish reason, and the usage chunk when the request asked for it."""
        out = [self._object("chat.completion.chunk", choices=[self._choice({"delta": {}}, self.finish(stats))])]
        if self.request.include_usage:
            out.append(self._object("chat.completion.chunk", choices=[], usage=usage(stats)))
        return out

    def completion(self, stats: GenerationStats) -> dict:
        extra = {"exit_layers": [ev.exit_layer for ev in self.events]}
        if self.speculative:
            extra["drafted"] = [ev.drafted for ev in self.events]
        message = {"role": "assistant", "content": "".join(ev.text for ev in self.events)}
        return self._object("chat.completion", choices=[self._choice({"message": message}, self.finish(stats),
                                                                     **extra)], usage=usage(stats))

    @staticmethod
    def finish(stats: GenerationStats) -> str:
        return FINISH.get(stats.stopped, "stop")
