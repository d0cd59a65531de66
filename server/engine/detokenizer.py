"""Turning generated ids into text one token at a time, without splitting multi-byte characters."""

from __future__ import annotations


class IncrementalDetokenizer:
    """Decodes a short window of recent ids per step (vLLM/TGI's prefix and read offsets)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.prefix_offset = 0
        self.read_offset = 0

    def step(self, ids: list[int]) -> str:
        """The new text that `ids[-1]` completes ('' while a character is still incomplete)."""
        decode = self.tokenizer.decode
        prefix_text = decode(ids[self.prefix_offset:self.read_offset], skip_special_tokens=True)
        new_text = decode(ids[self.prefix_offset:], skip_special_tokens=True)
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(ids)
            return new_text[len(prefix_text):]
        return ""
