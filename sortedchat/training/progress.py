"""What a training run shows while it runs: a rich bar on a terminal, one plain line per interval otherwise."""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


def format_exit_losses(losses: dict[int, float]) -> str:
    return " ".join(f"{e}:{v:.3f}" for e, v in sorted(losses.items()))


def format_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class TrainProgress:
    """Step, ETA, tokens/s and the loss of each exit. Silent on processes other than the main one."""

    def __init__(self, total: int, start: int, console: Console | None, enabled: bool = True, log_interval: int = 10):
        self.console = console or Console(stderr=True, highlight=False, soft_wrap=True)
        self.enabled = enabled
        self.total, self.start, self.log_interval = total, start, log_interval
        self.t0 = time.perf_counter()
        self.bar = None
        if enabled and self.console.is_terminal:
            self.bar = Progress(
                TextColumn("[bold]step"), MofNCompleteColumn(), BarColumn(), TimeRemainingColumn(),
                TextColumn("{task.fields[rate]}"), TextColumn("{task.fields[losses]}"),
                console=self.console, transient=False,
            )
            self.task = self.bar.add_task("train", total=total, completed=start, rate="", losses="")

    def __enter__(self) -> "TrainProgress":
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()

    def print(self, message: str) -> None:
        if self.enabled:
            self.console.print(message)

    def update(self, step: int, loss: float, exit_losses: dict[int, float], tokens_per_second: float,
               lr: float) -> None:
        if not self.enabled:
            return
        rate = f"{tokens_per_second:,.0f} tok/s"
        losses = f"loss {loss:.3f} · {format_exit_losses(exit_losses)}"
        if self.bar is not None:
            self.bar.update(self.task, completed=step, rate=rate, losses=losses)
            return
        if step % self.log_interval == 0 or step == self.total:
            done = step - self.start
            eta = (time.perf_counter() - self.t0) / done * (self.total - step) if done else 0.0
            self.console.print(f"step {step}/{self.total} · {losses} · {rate} · lr {lr:.2e} · "
                               f"eta {format_duration(eta)}")
