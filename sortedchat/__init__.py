"""sortedchat: chat with a Sorted Fine-Tuned (SoFT) model whose depth adapts per token."""

__version__ = "0.1.0"


class SortedChatError(Exception):
    """An error a user can fix: the CLI prints its message on one line and exits non-zero."""


def first_line(exc: BaseException) -> str:
    """The first line of a library's exception (or its class name), to quote inside a one-line error."""
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
