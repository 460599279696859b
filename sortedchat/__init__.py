"""sortedchat: chat with a Sorted Fine-Tuned (SoFT) model whose depth adapts per token."""

__version__ = "0.1.0"


class SortedChatError(Exception):
    """An error a user can fix: the CLI prints its message on one line and exits non-zero."""
