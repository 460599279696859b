"""The progress callback of the long steps (preparing the default model, converting, loading, calibrating).

A step reports `progress(stage, fraction)`: what it is doing and how far it is (None where it cannot tell).
The command line draws it; library callers that pass nothing get `quiet`."""

from __future__ import annotations

from collections.abc import Callable

Progress = Callable[[str, float | None], None]


def quiet(stage: str, fraction: float | None = None) -> None:
    """Report nothing."""
