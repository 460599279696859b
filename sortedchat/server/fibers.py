"""Generations that stop half-way through a step to wait for a batch: a `Fiber` runs one piece of work on a thread
of its own, in turn with the engine thread, never beside it.

A decoding step is plain sequential code (`ChatSession`'s step functions). To run the steps of several requests
together, the engine thread starts each request's step on its fiber; the step runs until it needs its layers,
hands that request over (`ask`) and waits; when every fiber waits or has finished its step, the engine
thread computes all the requests at once and resumes each fiber with its answer. Exactly one thread runs at any
time (a fiber, or the engine thread), so the engine's state needs no lock and torch computes on one thread at a
time.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Ask:
    """The fiber waits for the answer to `request`."""

    request: object


@dataclass(frozen=True)
class Returned:
    """The work returned `value`."""

    value: object


@dataclass(frozen=True)
class Raised:
    """The work raised `error` (StopIteration included)."""

    error: BaseException


class Fiber:
    """A thread that runs work handed to it by `start`, pausing in `ask` until `resume` answers. `start` and
    `resume` return when the fiber asks again or its work ends (`Ask`, `Returned`, `Raised`); `close` ends the
    thread."""

    def __init__(self, name: str):
        self._go, self._back = threading.Semaphore(0), threading.Semaphore(0)
        self._work: Callable[[], object] | None = None
        self._answer: object = None
        self._outcome: Ask | Returned | Raised | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()

    # -- the engine thread -------------------------------------------------------------------------
    def start(self, work: Callable[[], object]) -> Ask | Returned | Raised:
        self._work = work
        return self._switch()

    def resume(self, answer: object) -> Ask | Returned | Raised:
        """Answer the fiber's `Ask` (an exception is raised in the fiber)."""
        self._answer = answer
        return self._switch()

    def close(self) -> None:
        """End the thread (its work must be over: between `Returned`/`Raised` and the next `start`)."""
        self._closed = True
        self._go.release()
        self._thread.join()

    def _switch(self) -> Ask | Returned | Raised:
        self._go.release()
        self._back.acquire()
        return self._outcome

    # -- the fiber's thread ------------------------------------------------------------------------
    def ask(self, request: object) -> object:
        """Hand `request` to the engine thread and wait for its answer."""
        self._outcome = Ask(request)
        self._back.release()
        self._go.acquire()
        answer, self._answer = self._answer, None
        if isinstance(answer, BaseException):
            raise answer
        return answer

    def _main(self) -> None:
        while True:
            self._go.acquire()
            if self._closed:
                return
            work, self._work = self._work, None
            try:
                self._outcome = Returned(work())
            except BaseException as exc:  # noqa: BLE001 - handed to the engine thread, which decides
                self._outcome = Raised(exc)
            self._back.release()
