"""Incremental detokenization: the text each new token adds, correct for merged and multi-byte tokens."""

from __future__ import annotations


class IncrementalText:
    """Decodes a growing list of token ids, handing out only the new text.

    Decoding token by token breaks characters that span several byte-level tokens, and some tokenizers
    merge spaces across tokens; decoding a small window and diffing avoids both. A trailing U+FFFD means
    a character is still incomplete, so its piece waits for the next token.
    """

    def __init__(self, tokenizer, skip_ids: set[int] = frozenset()):
        self.tokenizer = tokenizer
        self.skip = set(skip_ids)
        self.ids: list[int] = []
        self.prefix_start = 0  # window start: text before it is final
        self.read_offset = 0  # ids[:read_offset] are already emitted
        self.text = ""

    def push(self, token_id: int) -> str:
        if token_id in self.skip:
            return ""
        self.ids.append(token_id)
        prefix = self.tokenizer.decode(self.ids[self.prefix_start : self.read_offset])
        full = self.tokenizer.decode(self.ids[self.prefix_start :])
        if full.endswith("\ufffd") or len(full) <= len(prefix):
            return ""
        piece = full[len(prefix) :]
        self.prefix_start = self.read_offset
        self.read_offset = len(self.ids)
        self.text += piece
        return piece
