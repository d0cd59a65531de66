"""Structured output: a request's grammar (JSON schema or regex) masks its logits step by step.

Each constrained request holds its own matcher (`Sequence.constraint`), made in the request
handler from a compiled grammar (`Grammars.compile`, cached by schema), so that a bad schema is a
422 there and never reaches the engine thread. On that thread, `apply` masks the constrained rows
of a step's logits before sampling (one bitmask [rows, vocab/32] filled by the library, unpacked
and applied in one torch op; nothing at all when no row is constrained), and the engine advances a
matcher on every token it records (`Constraint.advance`). A matcher's state follows the request's
kept tokens, so a preempted request (recomputed later) goes on where it was. EOS is allowed only
where the grammar accepts; once the grammar can take nothing more, the request ends (eos_token).

The library is llguidance (Microsoft; the engine under vLLM's and SGLang's `guidance` backend, and
llama.cpp's): a dependency-free Rust wheel, lazy (an Earley parser over a token trie: no per-schema
automaton over the vocabulary), so compiling is cheap. Measured on this 2-core AVX-512 machine with
a six-field schema (string, integer, email, array, enum, nested object with a pattern), consuming
a 164-token (byte tokenizer) / 56-token (BPE) answer:

                              259-token demo tokenizer      32k BPE (trained offline)
  llguidance 1.9.1            compile 1.2 ms, mask 18 us     compile 1.6 ms, mask 52 us (max 350)
  outlines-core 0.2.14        compile 9 ms, mask <1 us       compile 666 ms, mask 16 us
  (tokenizer's vocabulary, once per server: llguidance 3 / 171 ms, outlines-core 1 / 217 ms)

outlines-core precomputes a DFA over the vocabulary: masks are cheaper, but the compile grows with
schema and vocabulary (0.7 s here, seconds on a 150k vocabulary), and recursive schemas are out.
xgrammar 0.2.8 needs triton and apache-tvm-ffi besides torch, so it was not taken.

Per step, 16 constrained rows of 64 (`apply`, alone on this machine): filling the bitmask 0.1-0.2 ms
(sequentially on the engine thread: llguidance's parallel `LLExecutor` keeps its own thread pool,
whose threads took CPU from torch's in the forward on 2 cores), unpacking and masking 25 us at
259 tokens, 1.5 ms at 32k (the masked copy of the rows dominates; the unpack is 0.1 ms). A step of
the bench model is about 50 ms here. `python -m bench.structured` (64 requests x 64 tokens, 16 under
a JSON schema, in-process, machine otherwise idle): float32 1340 against 1361 tok/s unconstrained
(ratio 1.015) and 1270 against 1262 (0.993); bfloat16 2362 against 2299 (0.973). With other jobs
sharing the 2 cores the figures swing by 4x between runs either way: compare quiet runs only.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass

import llguidance
import llguidance.hf
import llguidance.torch
import torch

from .request import InvalidRequest

# Whitespace the JSON grammar allows between tokens: one space, or a newline and an indent
# (`{"a": 1}`, or as json.dumps(indent=...) writes it), not a run of any whitespace, which weak
# models fall into (the demo model wrote tabs and carriage returns until max_new_tokens).
JSON_WHITESPACE = r"(\x20|\x0A\x20{0,16})?"
CACHE_SIZE = 256  # compiled grammars kept


@dataclass(frozen=True)
class GrammarSpec:
    """What a request asks for, before compiling: plain data from the HTTP layer."""

    kind: str  # "json" (value: a JSON schema, as canonical JSON text) or "regex" (value: the pattern)
    value: str
    param: str  # the request parameter it came from, for error messages

    @classmethod
    def json_schema(cls, schema, param: str) -> "GrammarSpec":
        """schema: a dict, or its JSON text. InvalidRequest naming `param` if it is neither."""
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except ValueError as exc:
                raise InvalidRequest(param, f"the schema is not valid JSON: {exc}") from None
        if not isinstance(schema, (dict, bool)):
            raise InvalidRequest(param, f"a JSON schema must be an object, got {type(schema).__name__}")
        # Keys keep their order: the grammar writes properties in the schema's order.
        return cls("json", json.dumps(schema, separators=(",", ":")), param)

    @classmethod
    def regex(cls, pattern, param: str) -> "GrammarSpec":
        if not isinstance(pattern, str) or not pattern:
            raise InvalidRequest(param, f"a regex must be a non-empty string, got {pattern!r}")
        return cls("regex", pattern, param)


class Constraint:
    """One request's matcher: which tokens may come next, advanced by each token it takes."""

    def __init__(self, matcher: llguidance.LLMatcher):
        self.matcher = matcher

    def advance(self, token_id: int) -> None:
        """Take the token the request was given; ValueError if the grammar refuses it."""
        if not self.matcher.consume_token(token_id):
            raise ValueError(f"the grammar refused token {token_id}: {self.matcher.get_error()}")

    @property
    def complete(self) -> bool:
        """The grammar can take nothing more: the request is done."""
        return self.matcher.is_stopped()


class Grammars:
    """Per server: the library's view of the tokenizer (built once, on first use) and a bounded LRU
    of compiled grammars. Thread-safe: compiles run on worker threads."""

    def __init__(self, tokenizer, vocab_size: int, eos_ids: set[int], cache_size: int = CACHE_SIZE):
        """vocab_size: the model's logits width (may exceed the tokenizer's; the extra ids are never allowed)."""
        self._hf, self.vocab_size, self._eos = tokenizer, vocab_size, sorted(eos_ids)
        self._tokenizer: llguidance.LLTokenizer | None = None
        self._cache: OrderedDict[GrammarSpec, llguidance.LLMatcher] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    @property
    def tokenizer(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._tokenizer is None:
                eos = self._eos if len(self._eos) > 1 else (self._eos[0] if self._eos else None)
                self._tokenizer = llguidance.hf.from_tokenizer(self._hf, n_vocab=self.vocab_size, eos_token=eos)
            return self._tokenizer

    def compile(self, spec: GrammarSpec) -> "Grammar":
        """The compiled grammar (cached); InvalidRequest naming `spec.param` if it does not compile."""
        with self._lock:
            template = self._cache.get(spec)
            if template is not None:
                self._cache.move_to_end(spec)
                return Grammar(template)
        try:
            if spec.kind == "json":
                text = llguidance.LLMatcher.grammar_from_json_schema(
                    spec.value, defaults={"whitespace_pattern": JSON_WHITESPACE})
            else:
                text = llguidance.LLMatcher.grammar_from_regex(spec.value)
        except ValueError as exc:
            raise InvalidRequest(spec.param, f"invalid {_WHAT[spec.kind]}: {exc}") from None
        template = llguidance.LLMatcher(self.tokenizer, text, log_level=0)
        if template.is_error():
            raise InvalidRequest(spec.param, f"invalid {_WHAT[spec.kind]}: {_first_line(template.get_error())}")
        with self._lock:
            self._cache[spec] = template
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return Grammar(template)


_WHAT = {"json": "JSON schema", "regex": "regex"}


def vocab_size(model) -> int:
    """The model's logits width, from its config (its output weights may be packed away: cpu_linear)."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return config.vocab_size


def _first_line(error: str) -> str:
    """The library's message without its source excerpt: its first line and its `error:` lines."""
    lines = [line.strip() for line in error.strip().splitlines() if line.strip()]
    if not lines:
        return "unknown error"
    return "; ".join([lines[0]] + [line for line in lines[1:] if line.startswith("error:")])


class Grammar:
    """A compiled grammar; each request takes its own `constraint()` from it."""

    def __init__(self, template: llguidance.LLMatcher):
        self._template = template

    def constraint(self) -> Constraint:
        return Constraint(self._template.deep_copy())


@torch.inference_mode()  # the forward's logits are inference tensors: masked in place, only the constrained rows
def apply(logits: torch.Tensor, batch: list) -> torch.Tensor:
    """logits: [rows, vocab], one row per request of `batch` (`Sequence`s). Returns `logits`, each
    constrained row's disallowed tokens set to -inf in place (nothing done when no row is constrained)."""
    rows = [seq.constraint.matcher for seq in batch if seq.constraint is not None]
    if not rows:
        return logits
    vocab = logits.shape[-1]
    bitmask = torch.empty((len(rows), (vocab + 31) // 32), dtype=torch.int32)  # [constrained rows, words]
    for k, matcher in enumerate(rows):  # on this thread: see the module's docstring
        llguidance.torch.fill_next_token_bitmask(matcher, bitmask, k)
    index = torch.tensor([i for i, seq in enumerate(batch) if seq.constraint is not None], dtype=torch.long)
    allowed = unpack(bitmask, vocab).to(logits.device)  # [constrained rows, vocab]
    index = index.to(logits.device)
    return logits.index_put_((index,), logits[index].masked_fill_(~allowed, float("-inf")))


_BITS = torch.arange(32, dtype=torch.int32)


def unpack(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    """bitmask: [rows, words] int32, bit j of word w set when token 32*w + j is allowed.
    Returns [rows, vocab] bool."""
    bits = (bitmask.unsqueeze(-1) >> _BITS) & 1  # [rows, words, 32]
    return bits.flatten(1)[:, :vocab].bool()
