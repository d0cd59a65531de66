"""Turning generated ids into text one token at a time, without splitting multi-byte characters."""

from __future__ import annotations

CONTEXT = 5  # prompt tokens decoded before the first generated one (TGI's and vLLM's choice)


class IncrementalDetokenizer:
    """Decodes a short window of recent ids per step (vLLM/TGI's prefix and read offsets).

    The window starts with the prompt's last tokens, so the first generated token is decoded in
    context: SentencePiece-style tokenizers (a Metaspace `▁`) would otherwise drop its leading space.
    """

    def __init__(self, tokenizer, prompt_ids: list[int]):
        self.tokenizer = tokenizer
        self.ids = list(prompt_ids[-CONTEXT:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def step(self, token_id: int) -> str:
        """The new text that `token_id` completes ('' while a character is still incomplete)."""
        self.ids.append(token_id)
        decode = self.tokenizer.decode
        prefix_text = decode(self.ids[self.prefix_offset:self.read_offset], skip_special_tokens=True)
        new_text = decode(self.ids[self.prefix_offset:], skip_special_tokens=True)
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return new_text[len(prefix_text):]
        return ""
