"""A short throwaway answer while the loading screen still shows, so the user's first answer is not the slow one.

The first tokens after a launch pay one-time costs: the head's copies and the timing that chooses its screen
(`HeadProduct`), PyTorch's kernel and allocator set-up, the confidence measure of auto mode. Paying them behind
the loading screen makes the first real answer run at the speed of the later ones.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from sortedchat import SortedChatError

if TYPE_CHECKING:
    from sortedchat.engine import Mode
    from sortedchat.sorted_model import SortedModel

WARM_UP_TOKENS = 8
# About as long as a first question, so the prompt pass runs at a realistic length too.
WARM_UP_PROMPT = [{"role": "user", "content": "Hello! In two short sentences, what can you help me with today?"}]


def warm_up(sm: SortedModel, mode: Mode | None, should_stop: Callable[[], bool]) -> int:
    """Answer a short prompt in `mode` (the app's starting mode) in a session that is then dropped;
    returns the tokens generated. Stops early when `should_stop()` (the user quit)."""
    from sortedchat.engine import ChatSession, SamplingConfig

    session = ChatSession(sm, mode)
    sampling = SamplingConfig(max_new_tokens=WARM_UP_TOKENS)
    try:
        return sum(1 for _ in session.generate(WARM_UP_PROMPT, sampling, should_stop=should_stop))
    except SortedChatError:  # e.g. a tiny context: the real answer will say what is wrong
        return 0
