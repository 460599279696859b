"""One engine thread runs every request's generation, a step of each in turn, so that no request starves.

`ChatSession` is not thread-safe and the requests share one `SortedModel`, so the HTTP side never touches the
engine: it `submit`s a `Job` and reads the job's events from its `outbox` (an asyncio queue the engine thread
fills through the event loop). Up to `slots` jobs generate at once, each on its own session from the
`SessionPool`; up to `queue` more wait for a slot, and a request beyond that is refused (`Busy`, a 503). The
engine works in rounds: every job holding a slot takes one step (one token, or a speculative round), the newest
first; a request that finds a free slot joins the next round, so its prompt is read after at most one round of
the running answers. With several jobs in a round, each step runs on the job's `Fiber` and their layers are
computed together (`batching`); a lone job steps on the engine thread itself. A job the client gave up on
(`cancel`) is ended before its next step.
"""

from __future__ import annotations

import asyncio
import collections
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from sortedchat import SortedChatError
from sortedchat.engine.events import GenerationStats, TokenEvent
from sortedchat.engine.modes import Mode
from sortedchat.engine.sampling import SamplingConfig
from sortedchat.engine.session import StepRunner
from sortedchat.server.batching import BatchRunner, run_together
from sortedchat.server.fibers import Ask, Fiber, Returned
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
    runner: BatchRunner = field(default_factory=BatchRunner, repr=False)  # the session's, while the job holds it
    fiber: Fiber | None = field(default=None, repr=False)  # made when the job first steps beside another
    shared: bool = False  # the step in progress computed something together with another job's

    @classmethod
    def to_loop(cls, loop: asyncio.AbstractEventLoop, outbox: asyncio.Queue, **fields) -> "Job":
        """A job whose events land in `outbox`, an asyncio queue served by `loop`."""
        def deliver(item):
            loop.call_soon_threadsafe(outbox.put_nowait, item)

        return cls(deliver=deliver, **fields)


def failure(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, SortedChatError) else f"{type(exc).__name__}: {exc}"


class Scheduler:
    """The engine thread and its jobs: `start`, `submit`, `cancel`, `stop`; `counts` tells what it holds.

    Slots are handed out under the lock, by whichever thread frees or asks for one (`_fill`): a request that finds
    a free slot holds it at once, first in `active`, the order of a round; it steps in the next round."""

    def __init__(self, sm, slots: int = 4, queue: int = 16, batch: bool = True, spare_sessions: int = 4):
        check_capacity(slots, queue)
        self.sm, self.slots, self.queue_size, self.batch = sm, slots, queue, batch
        self.batched_steps = 0  # steps that computed something together with another request's
        # Touched by the engine thread only.
        self.pool = SessionPool(sm, slots + spare_sessions)
        self.waiting: collections.deque[Job] = collections.deque()
        self.active: list[Job] = []
        self.ended: collections.deque[Job] = collections.deque(maxlen=64)  # the last jobs ended, newest last
        self.finished = self.interrupted = 0  # jobs ended, however; of them, those their client left
        self._wake = threading.Condition()  # guards the lists, the counters and `_round` (re-entrant)
        self._round: list[Job] = []  # the jobs of the round in progress
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
            elif job in self.active and job.generation is None and job not in self._round:
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
        """Waiting jobs into free slots (under the lock), first in the order of the rounds."""
        placed = 0
        while self.waiting and len(self.active) < self.slots:
            self.active.insert(placed, self.waiting.popleft())
            placed += 1

    # -- the engine thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._wake:
                while not (self._stopping or self.active):
                    self._wake.wait()
                if self._stopping:
                    break
                self._round = list(self.active)
            self._step_round(self._round)
            with self._wake:
                self._round = []
        for job in list(self.waiting) + self.active:
            job.cancelled = True
            self._end(job)

    def _step_round(self, jobs: list[Job]) -> None:
        """One step of each job: on its fiber, their layers computed together, when several step and
        batching is on; else one after the other on this thread. Each token is delivered as soon as it is
        chosen, in the round's order."""
        ready = []
        for job in jobs:
            if job.cancelled:
                self._end(job)
            elif job.generation is not None or self._admit(job):
                ready.append(job)
        together = self.batch and len(ready) > 1  # of the jobs still there: one alone steps on this thread
        pending: dict[Job, object] = {}
        for job in ready:
            job.shared = False
            work = job.generation.__next__
            if together:
                job.fiber = job.fiber or Fiber(f"sortedchat-job-{id(job):x}")
                job.runner.fiber = job.fiber
                pending[job] = job.fiber.start(work)
            else:
                job.runner.fiber = None
                try:
                    self._stepped(job, Returned(work()))
                except Exception as exc:  # noqa: BLE001 - a failed answer ends that request, never the server
                    self._stepped(job, exc)
        while pending:
            for job in [job for job, outcome in pending.items() if not isinstance(outcome, Ask)]:
                outcome = pending.pop(job)
                self._stepped(job, outcome if isinstance(outcome, Returned) else outcome.error)
            if not pending:
                break
            answers, shared = run_together([outcome.request for outcome in pending.values()])
            for (job, _), answer, joint in zip(list(pending.items()), answers, shared):
                job.shared |= joint
                pending[job] = job.fiber.resume(answer)

    def _admit(self, job: Job) -> bool:
        """The job's first step is coming: lend it a session and start its generation (False: it failed)."""
        try:
            job.session = self.pool.take(job.prompt)
            job.session.mode = job.mode
            job.session.restart_drafting()  # each request starts drafting as it asked
            job.session.runner = job.runner
            job.generation = job.session.generate_ids(job.prompt, job.sampling, lambda: job.cancelled)
            return True
        except Exception as exc:  # noqa: BLE001 - a failed answer ends that request, never the server
            self._end(job, Done(job.stats, failure(exc)))
            return False

    def _stepped(self, job: Job, outcome: Returned | BaseException) -> None:
        """A step is over: deliver its token, or end the job (its answer is over, or failed)."""
        job.stats = job.session.last_stats
        if isinstance(outcome, StopIteration):
            self._end(job)
        elif isinstance(outcome, BaseException):
            self._end(job, Done(job.stats, failure(outcome)))
        else:
            job.last = outcome.value
            self.batched_steps += job.shared
            try:
                job.deliver(job.last)
            except Exception as exc:  # noqa: BLE001 - nobody is listening any more
                self._end(job, Done(job.stats, failure(exc)))

    def _end(self, job: Job, done: Done | None = None) -> None:
        """Close the job's generation and fiber, return its session, free its slot, tell the client (if still
        there)."""
        if job.generation is not None:
            job.generation.close()
        if job.fiber is not None:
            job.fiber.close()
            job.fiber = None
        if job.cancelled and job.stats is not None and not job.stats.stopped:
            job.stats.stopped = "interrupted"
        if job.session is not None:
            job.session.runner = StepRunner()  # not this job's runner, whose fiber is closed
            self.pool.give_back(job.session, usable=done is None or done.error is None)
            job.session = None
        with self._wake:
            if job in self.active:
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
