"""The decoding engine: one layered KV state, three modes (fixed depth, auto exit, self-speculative).

The names load on first use (PEP 562), so a front end can import `sortedchat.engine.modes` (the `Mode` and
`ModeKind` its options build, and `SamplingConfig`) without loading torch, which the session needs.
"""

from importlib import import_module

_HOME = {
    "ChatSession": "session",
    "GenerationStats": "events",
    "Mode": "modes",
    "ModeKind": "modes",
    "SamplingConfig": "sampling_config",
    "TokenEvent": "events",
}
__all__ = sorted(_HOME)


def __getattr__(name: str):
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"sortedchat.engine.{_HOME[name]}"), name)
