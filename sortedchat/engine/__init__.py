"""The decoding engine: one layered KV state, three modes (fixed depth, auto exit, self-speculative)."""

from sortedchat.engine.events import GenerationStats, TokenEvent
from sortedchat.engine.modes import Mode, ModeKind
from sortedchat.engine.sampling import SamplingConfig
from sortedchat.engine.session import ChatSession

__all__ = ["ChatSession", "GenerationStats", "Mode", "ModeKind", "SamplingConfig", "TokenEvent"]
