"""One engine thread runs every request's generation, token by token in turn, so that no request starves.

`ChatSession` is not thread-safe and the requests share one `SortedModel`, so the HTTP side never touches the
engine: it `submit`s a `Job` and reads the job's events from its `outbox` (an asyncio queue the engine thread
fills through the event loop). Up to `slots` jobs generate at once, each on its own session from the
`SessionPool`; up to `queue` more wait for a slot, and a request beyond that is refused (`Busy`, a 503). A
request that finds a free slot takes it at once and steps right after the step in progress, so its prompt is
read after at most one step of the running answers. When several running answers take fixed-depth steps, the
first of them to come up computes all of theirs as one batch (`batching`); the others' turns then only pick
their tokens. A job the client gave up on (`cancel`) is ended before its next step.
"""

from __future__ import annotations

import asyncio
import collections
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from sortedchat import SortedChatError
from sortedchat.engine.events import GenerationStats, TokenEvent
from sortedchat.engine.modes import Mode, ModeKind
from sortedchat.engine.sampling import SamplingConfig
from sortedchat.engine.session import ChatSession
from sortedchat.server.batching import BatchedSession, can_batch, prefetch
from sortedchat.server.sessions import SessionPool


def check_capacity(slots: int, queue: int) -> None:
    if slots < 1 or queue < 0:
        raise SortedChatError(f"--slots must be at least 1 and --queue at least 0, got {slots} and {queue}")


class Busy(Exception):
    """Every slot and every place in the queue is taken."""


@dataclass(frozen=True)
class Done:
    """The last item of a job's outbox: the answer's stats, or the error that ended it."""

    stats: GenerationStats | None
    error: str | None = None


@dataclass(eq=False)
class Job:
    """One request's generation. `deliver` is called on the engine thread with each `TokenEvent`, then a `Done`."""

    prompt: list[int]
    mode: Mode
    sampling: SamplingConfig
    deliver: Callable[[TokenEvent | Done], None]
    cancelled: bool = False  # the client left before the answer ended
    ended: bool = False
    stats: GenerationStats | None = None
    generation: object = field(default=None, repr=False)  # the session's event iterator, once admitted
    last: TokenEvent | None = None  # the last token delivered
    session: object = field(default=None, repr=False)

    @classmethod
    def to_loop(cls, loop: asyncio.AbstractEventLoop, outbox: asyncio.Queue, **fields) -> "Job":
        """A job whose events land in `outbox`, an asyncio queue served by `loop`."""
        def deliver(item):
            loop.call_soon_threadsafe(outbox.put_nowait, item)

        return cls(deliver=deliver, **fields)


class Scheduler:
    """The engine thread and its jobs: `start`, `submit`, `cancel`, `stop`; `counts` tells what it holds.

    Slots are handed out under the lock, by whichever thread frees or asks for one (`_fill`): a request that finds
    a free slot holds it at once, and runs right after the step in progress. `active` is the round-robin order;
    `_turn` is the index of the job that steps next."""

    def __init__(self, sm, slots: int = 4, queue: int = 16, batch: bool = True, spare_sessions: int = 4):
        check_capacity(slots, queue)
        self.sm, self.slots, self.queue_size, self.batch = sm, slots, queue, batch
        self.batched_steps = 0  # fixed-depth steps computed in a batch of several requests
        # Touched by the engine thread only.
        self.pool = SessionPool(sm, slots + spare_sessions, BatchedSession if batch else ChatSession)
        self.waiting: collections.deque[Job] = collections.deque()
        self.active: list[Job] = []
        self.ended: collections.deque[Job] = collections.deque(maxlen=64)  # the last jobs ended, newest last
        self.finished = self.interrupted = 0  # jobs ended, however; of them, those their client left
        self._wake = threading.Condition()  # guards the lists, the counters and `_turn` (re-entrant)
        self._turn = 0
        self._stepping: Job | None = None
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="sortedchat-engine", daemon=True)

    # -- any thread ----------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Job) -> None:
        with self._wake:
            if self._stopping or len(self.waiting) + len(self.active) >= self.slots + self.queue_size:
                raise Busy
            self.waiting.append(job)
            self._fill()
            self._wake.notify()

    def cancel(self, job: Job) -> None:
        """The client is gone: the job ends before its next step, at once if it has not started (waiting for a
        slot, or holding one it has not stepped in yet: nothing of the engine's to close)."""
        with self._wake:
            job.cancelled = not job.ended
            if job in self.waiting:
                self.waiting.remove(job)
                self._end(job)
            elif job in self.active and job.generation is None and job is not self._stepping:
                self._end(job)
            self._wake.notify()

    def counts(self) -> dict[str, int]:
        with self._wake:
            return {"active": len(self.active), "waiting": len(self.waiting), "slots": self.slots,
                    "queue": self.queue_size, "finished": self.finished, "interrupted": self.interrupted}

    def stop(self) -> None:
        """End every job and the engine thread (the server is shutting down)."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread.is_alive():
            self._thread.join()

    def _fill(self) -> None:
        """Waiting jobs into free slots (under the lock), placed to step next: right after the job stepping now."""
        while self.waiting and len(self.active) < self.slots:
            at = self.active.index(self._stepping) + 1 if self._stepping in self.active else self._turn
            self.active.insert(min(at, len(self.active)), self.waiting.popleft())

    # -- the engine thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._wake:
                while not (self._stopping or self.active):
                    self._wake.wait()
                if self._stopping:
                    break
                self._turn %= len(self.active)
                job = self._stepping = self.active[self._turn]
            if self.batch and self._batchable(job):
                self._prefetch()
            if not job.ended:  # (a failed batch ends its requests)
                self._step(job)
            with self._wake:
                if job in self.active:  # else it left, and the job after it moved into its place
                    self._turn = self.active.index(job) + 1
                self._stepping = None
        for job in list(self.waiting) + self.active:
            job.cancelled = True
            self._end(job)

    def _step(self, job: Job) -> None:
        """One token of `job` (the first step also reads its prompt); a job that is over leaves its slot."""
        if job.cancelled:
            self._end(job)
            return
        try:
            if job.generation is None:
                job.session = self.pool.take(job.prompt)
                job.session.mode = job.mode
                job.session.restart_drafting()  # each request starts drafting as it asked
                job.generation = job.session.generate_ids(job.prompt, job.sampling, lambda: job.cancelled)
            event = job.last = next(job.generation)
            job.stats = job.session.last_stats
            job.deliver(event)
        except StopIteration:
            job.stats = job.session.last_stats
            self._end(job)
        except Exception as exc:  # noqa: BLE001 - a failed answer ends that request, never the server
            self._end(job, Done(job.stats, str(exc) if isinstance(exc, SortedChatError)
                                else f"{type(exc).__name__}: {exc}"))

    def _batchable(self, job: Job) -> bool:
        """Whether the job's next step is a fixed-depth one that a batch can compute ahead."""
        last, session = job.last, job.session
        return (last is not None and session is not None and not job.cancelled and not last.is_stop
                and job.mode.kind is ModeKind.DEPTH and session.ready is None
                and last.index + 1 < job.sampling.max_new_tokens
                and can_batch(session, job.mode.depth or session.L))

    def _prefetch(self) -> None:
        """The next fixed-depth step of every request that takes one, in one batch (`batching`), when several do."""
        with self._wake:
            jobs = [job for job in self.active if self._batchable(job)]
        if len(jobs) < 2:
            return
        try:
            prefetch(self.sm, [job.session for job in jobs], [job.last.token_id for job in jobs],
                     [job.mode.depth or job.session.L for job in jobs])
            self.batched_steps += len(jobs)
        except Exception as exc:  # noqa: BLE001 - their states are part-way through a step: those answers end
            for job in jobs:
                self._end(job, Done(job.stats, f"batched step failed: {type(exc).__name__}: {exc}"))

    def _end(self, job: Job, done: Done | None = None) -> None:
        """Close the job's generation, return its session, free its slot, tell the client (if still there)."""
        if job.generation is not None:
            job.generation.close()
        if job.cancelled and job.stats is not None and not job.stats.stopped:
            job.stats.stopped = "interrupted"
        if job.session is not None:
            self.pool.give_back(job.session, usable=done is None or done.error is None)
            job.session = None
        with self._wake:
            if job in self.active:
                if self.active.index(job) < self._turn:  # the jobs after it move up: so does the turn
                    self._turn -= 1
                self.active.remove(job)
            job.ended = True
            self.finished += 1
            self.interrupted += job.cancelled
            self.ended.append(job)
            if not self._stopping:
                self._fill()
        try:
            job.deliver(done or Done(job.stats))
        except RuntimeError:  # the event loop has closed: nobody is listening any more
            pass
