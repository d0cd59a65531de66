"""Plain request types shared by the scheduler, the runner and the HTTP layer: no tensors here."""

from __future__ import annotations

import enum
import itertools
import math
import time
from dataclasses import dataclass, field
from typing import Callable

from adapters import Adapter


class InvalidRequest(ValueError):
    """A request parameter the server cannot honour; the message names it and its value."""

    def __init__(self, param: str, message: str):
        super().__init__(f"{param}: {message}")
        self.param = param


class Overloaded(RuntimeError):
    """The waiting queue is full, or the server is shutting down; retry later."""

    def __init__(self, message: str, retry_after: int = 1):
        super().__init__(message)
        self.retry_after = retry_after


class GenerationFailed(RuntimeError):
    """The engine could not run this request's step (its own fault, or the batch's)."""


MAX_TOP_LOGPROBS = 20  # alternatives a request may ask for per token (OpenAI's chat limit)


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 20
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None  # keep the k most likely tokens
    top_p: float | None = None  # keep the smallest set of tokens whose probability reaches p
    repetition_penalty: float | None = None  # > 1 discourages tokens already in prompt or output
    seed: int | None = None  # same seed and request give the same tokens, whatever the batch
    stop: tuple[str, ...] = ()  # generation ends once the text ends with one of these
    ignore_eos: bool = False
    skip_special_tokens: bool = True  # the text leaves special tokens (EOS, ...) out, as tokenizer.decode's flag
    frequency_penalty: float = 0.0  # OpenAI's, in [-2, 2]: subtracted once per time a token is in the output
    presence_penalty: float = 0.0  # OpenAI's, in [-2, 2]: subtracted once if a token is in the output
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias in [-100, 100]) added to its logit
    typical_p: float | None = None  # TGI's: keep the locally typical tokens holding this mass
    min_p: float = 0.0  # vLLM's: drop tokens less likely than min_p times the most likely one
    min_tokens: int = 0  # the end tokens (EOS, stop_token_ids) are masked until this many are generated
    stop_token_ids: tuple[int, ...] = ()  # generation ends once one of these is sampled
    top_logprobs: int = 0  # alternatives reported per token (their log-probabilities), at most MAX_TOP_LOGPROBS
    prompt_logprobs: bool = False  # each prompt token's log-probability under the model (and top_logprobs alternatives)

    def __post_init__(self):
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise InvalidRequest("max_new_tokens", f"must be a positive integer, got {self.max_new_tokens!r}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise InvalidRequest("temperature", f"must be >= 0, got {self.temperature!r}")
        if self.top_k is not None and self.top_k < 0:
            raise InvalidRequest("top_k", f"must be >= 0, got {self.top_k!r}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise InvalidRequest("top_p", f"must be in (0, 1], got {self.top_p!r}")
        if self.repetition_penalty is not None and not self.repetition_penalty > 0:
            raise InvalidRequest("repetition_penalty", f"must be > 0, got {self.repetition_penalty!r}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise InvalidRequest("seed", f"must be in [0, 2^63), got {self.seed!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise InvalidRequest("stop", f"stop sequences must be non-empty strings, got {list(self.stop)!r}")
        for name in ("frequency_penalty", "presence_penalty"):
            value = getattr(self, name)
            if not (math.isfinite(value) and -2 <= value <= 2):
                raise InvalidRequest(name, f"must be in [-2, 2], got {value!r}")
        for token, bias in self.logit_bias:
            if isinstance(token, bool) or not isinstance(token, int) or token < 0:
                raise InvalidRequest("logit_bias", f"keys must be token ids (integers >= 0), got {token!r}")
            if not (math.isfinite(bias) and -100 <= bias <= 100):
                raise InvalidRequest("logit_bias", f"biases must be in [-100, 100], got {bias!r} for token {token}")
        if self.typical_p is not None and not 0 < self.typical_p <= 1:
            raise InvalidRequest("typical_p", f"must be in (0, 1], got {self.typical_p!r}")
        if not (math.isfinite(self.min_p) and 0 <= self.min_p <= 1):
            raise InvalidRequest("min_p", f"must be in [0, 1], got {self.min_p!r}")
        if isinstance(self.min_tokens, bool) or not isinstance(self.min_tokens, int) or not (
                0 <= self.min_tokens <= self.max_new_tokens):
            raise InvalidRequest("min_tokens", f"must be an integer in [0, max_new_tokens ({self.max_new_tokens})], "
                                 f"got {self.min_tokens!r}")
        if any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise InvalidRequest("stop_token_ids", f"must be token ids (integers >= 0), got {list(self.stop_token_ids)!r}")
        if isinstance(self.top_logprobs, bool) or not isinstance(self.top_logprobs, int) or not (
                0 <= self.top_logprobs <= MAX_TOP_LOGPROBS):
            raise InvalidRequest("top_logprobs", f"must be an integer in [0, {MAX_TOP_LOGPROBS}], got {self.top_logprobs!r}")

    def check_token_ids(self, vocab_size: int) -> None:
        """InvalidRequest for a token id the model does not have (known once the model is)."""
        for name, ids in (("logit_bias", [t for t, _ in self.logit_bias]), ("stop_token_ids", self.stop_token_ids)):
            outside = [t for t in ids if t >= vocab_size]
            if outside:
                raise InvalidRequest(name, f"token id {outside[0]} is outside the vocabulary (0 to {vocab_size - 1})")

    @property
    def sampling(self) -> bool:
        """TGI's rule: sampling when asked, or when any warper is set; temperature 0 means greedy."""
        if self.temperature == 0:
            return False
        warped = (self.temperature != 1.0 or bool(self.top_k) or (self.top_p is not None and self.top_p < 1.0)
                  or (self.typical_p is not None and self.typical_p < 1.0) or bool(self.min_p))
        return self.do_sample or warped


class FinishReason(str, enum.Enum):
    LENGTH = "length"
    EOS = "eos_token"
    STOP = "stop_sequence"
    ABORT = "abort"


@dataclass(frozen=True)
class TokenEvent:
    """One generated token, as delivered to the request's consumer (streamed or collected)."""

    token_id: int
    text: str  # the text this token completes ('' while a multi-byte character is unfinished)
    logprob: float
    special: bool
    finish_reason: FinishReason | None  # set on the last event only
    top: tuple[tuple[int, float], ...] | None = None  # the most likely (id, logprob), best first; None unless asked


_ids = itertools.count()


@dataclass(eq=False)
class Sequence:
    """One request as the engine tracks it: prompt, adapter, parameters and what it has generated."""

    prompt_ids: list[int]
    params: SamplingParams
    adapter: Adapter | None = None  # held for the whole request, even if the adapter is deleted meanwhile
    on_token: Callable[["Sequence", TokenEvent], None] | None = None  # on the stepping thread; AsyncEngine: its event loop
    seed: int = 0  # the sampling seed in use: params.seed, or one drawn at submission
    id: int = field(default_factory=lambda: next(_ids))
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    text: str = ""  # decoded output so far
    detokenizer: object | None = field(default=None, repr=False)  # the engine's IncrementalDetokenizer for it
    finish_reason: FinishReason | None = None
    aborted: bool = False  # set from any thread; the scheduler drops the request at its next step
    arrival_time: float = field(default_factory=time.monotonic)
    first_token_time: float | None = None
    finish_time: float | None = None
    segment: object | None = field(default=None, repr=False)  # the runner's kv_cache.Segment while it holds KV
    shared_prefix: object | None = field(default=None, repr=False)  # the runner's kv_cache.SharedPrefix of its adapter, meanwhile
    sampler: object | None = field(default=None, repr=False)  # the runner's RowSampler, kept across preemptions
    preemptions: int = 0  # times its KV was taken back to make room; it then computes it again
    constraint: object | None = field(default=None, repr=False)  # grammar.Constraint: its structured output's matcher
    # params.prompt_logprobs: per prompt token, its log-probability under the raw model given the tokens
    # before it (None for the first), and its top_logprobs alternatives; filled by the runner as it prefills
    prompt_logprobs: list[float | None] = field(default_factory=list)
    prompt_top: list[tuple[tuple[int, float], ...] | None] = field(default_factory=list)
    # n / best_of: the other answers to the same prompt, queued with this one and holding KV from its
    # admission, not yet running; at the step that completes this one's prompt, its keys and values are
    # copied into theirs and each samples its own first token (`ModelRunner._fork`): the prompt is
    # computed once. Empty once forked, and for a request asked for one answer.
    siblings: list["Sequence"] = field(default_factory=list, repr=False)

    def __post_init__(self):
        if not self.prompt_ids:
            raise InvalidRequest("inputs", "the prompt has no tokens")

    @property
    def group(self) -> list["Sequence"]:
        """This request and the siblings it has not forked yet: what its admission admits."""
        return [self, *self.siblings]

    @property
    def prefix_length(self) -> int:
        return 0 if self.adapter is None else self.adapter.prefix_length

    @property
    def token_ids(self) -> list[int]:
        """Prompt and generated tokens: what its own segment holds (after the shared prefix), once computed."""
        return self.prompt_ids + self.output_ids

    @property
    def computed(self) -> int:
        """Tokens of `token_ids` whose keys and values its segment holds."""
        return 0 if self.segment is None else self.segment.length

    def next_ids(self, n: int) -> list[int]:
        """The next `n` pending token ids (no copy of the whole history for a decoding request)."""
        start, prompt = self.computed, len(self.prompt_ids)
        if start >= prompt:
            return self.output_ids[start - prompt:start - prompt + n]
        return (self.prompt_ids[start:start + n] if start + n <= prompt
                else self.prompt_ids[start:] + self.output_ids[:start + n - prompt])

    @property
    def pending(self) -> int:
        """Tokens of `token_ids` still to compute: its prompt (and, after a preemption, what it had
        generated) while prefilling; the token it feeds back (1) while decoding."""
        return len(self.prompt_ids) + len(self.output_ids) - self.computed

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
