"""The conversations the server keeps between requests, so that a request whose prompt starts like an earlier
one's (the next turn of a chat, a shared system prompt) reuses that prompt's K/V.

`ChatSession._prefill` already reuses the longest common prefix of its own state; the pool's part is to hand each
request the free session that shares the most with it. Only positions whose K/V every layer holds as computed
are kept (`exact_prefix`): K/V still waiting behind a shallow exit, or propagated from one, would make the answer
depend on the request that came before.
"""

from __future__ import annotations

from sortedchat.engine.session import ChatSession


def exact_prefix(session: ChatSession) -> int:
    """How many leading positions of the session every layer holds, computed at that layer (not propagated)."""
    state = session.state
    held = state.kv_len[-1] if state.num_layers else 0
    full = state.num_layers
    return next((p for p, filled in enumerate(state.filled_by[:held]) if filled < full), held)


def shared(session: ChatSession, prompt: list[int]) -> int:
    """Positions of `prompt` (but its last token, always fed anew) that the session can reuse."""
    n = 0
    for a, b in zip(session.state.tokens[: exact_prefix(session)], prompt[:-1]):
        if a != b:
            break
        n += 1
    return n


class SessionPool:
    """Up to `capacity` sessions over one model; `take` lends one to a request, `give_back` returns it."""

    def __init__(self, sm, capacity: int):
        self.sm, self.capacity = sm, capacity
        self.free: list[ChatSession] = []  # least recently used first
        self.lent = 0

    def take(self, prompt: list[int]) -> ChatSession:
        """The free session sharing the longest prefix with `prompt`, cut to that prefix; a new one when none
        shares any and there is room; else the least recently used, emptied."""
        best = max(self.free, key=lambda s: shared(s, prompt), default=None)
        common = shared(best, prompt) if best is not None else 0
        if common == 0 and (best is None or self.lent + len(self.free) < self.capacity):
            session = ChatSession(self.sm)
        else:
            session = best if common else self.free[0]
            self.free.remove(session)
        session.state.crop(common)  # what stays is what every layer holds exactly
        self.lent += 1
        return session

    def give_back(self, session: ChatSession, usable: bool = True) -> None:
        """Return a session after its answer; one whose generation failed part way is emptied first."""
        self.lent -= 1
        if not usable:
            session.reset()
        self.free.append(session)
        del self.free[: max(0, len(self.free) + self.lent - self.capacity)]
