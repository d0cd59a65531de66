"""Log-probabilities in each API's shape, from the engine's TokenEvents (`logprob`, and `top`
when the request asked for alternatives).

The values are the sampler's: `log_softmax` of the distribution each token was drawn from, after
the request's penalties, bias and warpers (TGI's choice; see server/engine/sampler.py).
A token's text here is `tokenizer.decode([id])`, the token alone, as vLLM shows alternatives.
"""

from __future__ import annotations

import functools

from server.engine.request import TokenEvent

from .schemas import Token


class TokenTexts:
    """Each token id's text alone, decoded once."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.special = set(tokenizer.all_special_ids)

    @functools.lru_cache(maxsize=65536)
    def __call__(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])


@functools.lru_cache(maxsize=8)
def token_texts(tokenizer) -> TokenTexts:
    return TokenTexts(tokenizer)


def tgi_top_tokens(event: TokenEvent, texts: TokenTexts) -> list[Token] | None:
    """TGI's `top_tokens` of one token (None when not asked)."""
    if event.top is None:
        return None
    return [Token(id=t, text=texts(t), logprob=lp, special=t in texts.special) for t, lp in event.top]


def completion_logprobs(events: list[TokenEvent], texts: TokenTexts, offset: int = 0) -> dict:
    """OpenAI completions' `choices[].logprobs` for `events`; `offset`: where the first one's text
    starts in the choice's text. `top_logprobs` maps each alternative's text to its logprob."""
    tokens, offsets = [], []
    for event in events:
        tokens.append(texts(event.token_id))
        offsets.append(offset)
        offset += len(event.text)
    return {"tokens": tokens, "token_logprobs": [e.logprob for e in events],
            "top_logprobs": [{texts(t): lp for t, lp in e.top or ()} for e in events], "text_offset": offsets}


def echoed_logprobs(seq, texts: TokenTexts, generated: dict, prompt_chars: int) -> dict:
    """Completions' `logprobs` with echo: the prompt's tokens first (their logprobs under the model
    alone, the first null), then `generated`'s, whose text offsets move past the prompt's text."""
    tokens, offsets, offset = [], [], 0
    for token_id in seq.prompt_ids:
        tokens.append(texts(token_id))
        offsets.append(offset)
        offset += len(tokens[-1])
    top = [None] + [{texts(t): lp for t, lp in alternatives or ()} for alternatives in seq.prompt_top[1:]]
    return {"tokens": tokens + generated["tokens"], "token_logprobs": list(seq.prompt_logprobs) + generated["token_logprobs"],
            "top_logprobs": top + generated["top_logprobs"],
            "text_offset": offsets + [prompt_chars + o for o in generated["text_offset"]]}


def chat_logprobs(events: list[TokenEvent], texts: TokenTexts) -> dict:
    """OpenAI chat's `choices[].logprobs` for `events`."""
    def entry(token_id: int, logprob: float) -> dict:
        text = texts(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {"content": [{**entry(e.token_id, e.logprob), "top_logprobs": [entry(t, lp) for t, lp in e.top or ()]}
                        for e in events]}
