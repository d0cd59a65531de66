"""HTTP request and response bodies (pydantic). Engine types stay in server/engine; the
`to_sampling_params()` methods are the one bridge between them.

Clients of TGI, LoRAX and OpenAI send every parameter they know, many as null or false: those
are accepted at their defaults, and a value this server cannot honour is refused naming it. A
field not known at all is ignored, and named in one log line per request (as vLLM does).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from adapters.sources import SOURCES
from server.engine.grammar import GrammarSpec
from server.engine.request import MAX_TOP_LOGPROBS, InvalidRequest, SamplingParams

log = logging.getLogger("softprompt.requests")

# Known parameters this server does not honour: name -> the values that mean "off", the only ones
# accepted. Shared by the routes; each schema adds its own below.
_UNSUPPORTED = {
    # sampling and decoding (TGI, vLLM, OpenAI)
    "skip_special_tokens": (None, True), "spaces_between_special_tokens": (None, True),
    "use_beam_search": (None, False), "length_penalty": (None, 1.0), "allowed_token_ids": (None,),
    "bad_words": (None, []), "watermark": (None, False),
    # what the answer carries
    "prompt_logprobs": (None,), "suffix": (None, ""),
    # structured output and tools
    "guided_json": (None,), "guided_regex": (None,),
    "guided_choice": (None,), "guided_grammar": (None,), "structured_outputs": (None,), "tools": (None, []),
    "tool_choice": (None, "none", "auto"), "functions": (None, []), "function_call": (None, "none", "auto"),
    # adapters and prompts (LoRAX, vLLM)
    "adapter_parameters": (None,), "merged_adapters": (None,), "api_token": (None,),
    "soft_prompt": (None,), "prompt_embeds": (None,), "truncate_prompt_tokens": (None,),
}
# Honoured on one family of routes, refused on the other (OpenAI's and vLLM's names, TGI's names).
_OPENAI_ONLY = {"min_p": (None, 0.0), "min_tokens": (None, 0), "frequency_penalty": (None, 0.0),
                "presence_penalty": (None, 0.0), "logit_bias": (None, {}), "stop_token_ids": (None, []),
                "logprobs": (None, False), "top_logprobs": (None, 0)}
_TGI_ONLY = {"typical_p": (None, 1.0), "top_n_tokens": (None, 0)}
_TGI_UNSUPPORTED = {**_UNSUPPORTED, **_OPENAI_ONLY, "return_k_alternatives": (None, 0), "n": (None, 1)}
_OPENAI_UNSUPPORTED = {**_UNSUPPORTED, **_TGI_ONLY, "include_stop_str_in_output": (None, False), "grammar": (None,),
                       "decoder_input_details": (None, False)}
_COMPLETION_UNSUPPORTED = {**_OPENAI_UNSUPPORTED, "top_logprobs": (None, 0),  # chat's: completions' is `logprobs`
                           "add_special_tokens": (None, True)}
_CHAT_UNSUPPORTED = {
    **_OPENAI_UNSUPPORTED, "add_special_tokens": (None, False), "add_generation_prompt": (None, True),
    "continue_final_message": (None, False), "chat_template": (None,), "chat_template_kwargs": (None, {}),
    "documents": (None,), "modalities": (None, ["text"]), "audio": (None,), "prediction": (None,),
    "reasoning_effort": (None,), "echo": (None, False),
}
_MESSAGE_UNSUPPORTED = {"tool_calls": (None, []), "tool_call_id": (None,), "function_call": (None,), "audio": (None,)}
# Known fields that change nothing in the output, accepted at any value and not logged.
_HARMLESS = frozenset({"user", "metadata", "store", "service_tier", "parallel_tool_calls"})


class _Lenient(BaseModel):
    """Fields a schema does not declare are kept (`model_extra`): one in `UNSUPPORTED` is refused at
    any value but its "off" ones; one not known at all is ignored (`check_fields` names it)."""

    model_config = ConfigDict(extra="allow")
    UNSUPPORTED: ClassVar[dict[str, tuple]] = {}

    def check_fields(self, prefix: str = "") -> list[str]:
        """InvalidRequest for a known field this server cannot honour, given at a value that is not
        off; else the names of the fields not known at all (to be ignored)."""
        unknown = []
        for name, value in (self.model_extra or {}).items():
            if name in self.UNSUPPORTED:
                _refuse(prefix + name, value, self.UNSUPPORTED[name])
            elif name not in _HARMLESS:
                unknown.append(prefix + name)
        return unknown


def _refuse(param: str, value: Any, off: tuple) -> None:
    if value in off:
        return
    accepted = " or ".join("null" if o is None else repr(o) for o in off)
    shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
    raise InvalidRequest(param, f"{shown} is not supported by this server (accepted: {accepted}, or leave it out)")


def _log_unknown(route: str, names: list[str]) -> None:
    if names:
        log.warning("%s: ignoring fields this server does not know: %s", route, ", ".join(names))


class GenerateParameters(_Lenient):
    UNSUPPORTED = _TGI_UNSUPPORTED

    adapter_id: str | None = None
    adapter_source: str | None = None  # LoRAX's: where an unknown adapter comes from; null: "local"
    adapter_task: int | None = None  # which task of a multitask prompt tuning adapter (0-based)
    soft_prompt: str | None = None  # ours: base64 safetensors [n, hidden], this request's own virtual tokens
    max_new_tokens: int | None = Field(default=20)
    do_sample: bool | None = False
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: list[str] | None = None
    details: bool | None = False
    return_full_text: bool | None = False
    truncate: int | None = None  # keep only the last `truncate` prompt tokens
    typical_p: float | None = None  # TGI's locally typical sampling
    top_n_tokens: int | None = None  # TGI's: the most likely alternatives of each token, in `top_tokens`
    ignore_eos_token: bool | None = False  # LoRAX's: generate max_new_tokens whatever the model says
    grammar: dict | None = None  # TGI's: {"type": "json", "value": schema} or {"type": "regex", "value": pattern}
    response_format: dict | None = None  # LoRAX's: {"type": "json_object", "schema": schema}
    decoder_input_details: bool | None = False  # TGI's: details.prefill, the prompt's tokens and their logprobs
    best_of: int | None = None  # TGI's: this many answers sampled, the most likely per token returned

    def answers(self, params: SamplingParams, stream: bool) -> Answers:
        """How many answers to generate and return (TGI's rules: best_of > 1 samples, and not streamed)."""
        best_of = _count("parameters.best_of", self.best_of)
        if best_of > 1 and not params.sampling:
            raise InvalidRequest("parameters.best_of", "you must use sampling when `best_of` is > 1 (set do_sample, "
                                 "or a temperature, top_k, top_p or typical_p)")
        if best_of > 1 and stream:
            raise InvalidRequest("parameters.best_of", "`best_of` != 1 is not supported when streaming tokens (as TGI)")
        return Answers(1, best_of, "parameters.best_of")

    def grammar_spec(self) -> GrammarSpec | None:
        """The structured output asked for (TGI's `grammar`, or LoRAX's `response_format`), or None."""
        if self.grammar is not None and self.response_format not in (None, {"type": "text"}):
            raise InvalidRequest("parameters.grammar", "give grammar or response_format, not both")
        if self.grammar is None:
            return _response_format(self.response_format, "parameters.response_format")
        kind, value = self.grammar.get("type"), self.grammar.get("value")
        if kind in ("json", "json_object", "json_schema"):
            if kind == "json_schema" and isinstance(value, dict) and "schema" in value:  # TGI 3's spelling
                value = value["schema"]
            return GrammarSpec.json_schema({"type": "object"} if value is None else value, "parameters.grammar.value")
        if kind == "regex":
            return GrammarSpec.regex(value, "parameters.grammar.value")
        raise InvalidRequest("parameters.grammar.type", f"{kind!r} is not supported (accepted: 'json', 'regex')")

    def to_sampling_params(self, default_max_new_tokens: int) -> SamplingParams:
        """The parameters alone (`GenerateRequest.to_sampling_params` checks the whole body)."""
        if self.adapter_source not in (None, *SOURCES):
            raise InvalidRequest("parameters.adapter_source", f"{self.adapter_source!r} is not supported; "
                                 f"use one of {', '.join(SOURCES)}")
        if self.truncate is not None and self.truncate < 1:
            raise InvalidRequest("parameters.truncate", f"must be a positive integer, got {self.truncate!r}")
        return SamplingParams(
            max_new_tokens=self.max_new_tokens if self.max_new_tokens is not None else default_max_new_tokens,
            do_sample=bool(self.do_sample),
            temperature=1.0 if self.temperature is None else self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            repetition_penalty=self.repetition_penalty,
            seed=self.seed,
            stop=tuple(self.stop or ()),
            ignore_eos=bool(self.ignore_eos_token),
            typical_p=self.typical_p,
            top_logprobs=_top_logprobs("parameters.top_n_tokens", self.top_n_tokens),
            prompt_logprobs=bool(self.decoder_input_details),
        )


class GenerateRequest(_Lenient):
    UNSUPPORTED = _TGI_UNSUPPORTED

    inputs: str
    parameters: GenerateParameters = Field(default_factory=GenerateParameters)
    stream: bool | None = False

    def to_sampling_params(self, default_max_new_tokens: int, route: str = "generate") -> SamplingParams:
        """The bridge to the engine: unsupported fields refused, unknown ones logged, then the parameters."""
        unknown = self.check_fields() + self.parameters.check_fields("parameters.")
        params = self.parameters.to_sampling_params(default_max_new_tokens)
        _log_unknown(route, unknown)
        return params


class Token(BaseModel):
    id: int
    text: str
    logprob: float | None
    special: bool


class PrefillToken(BaseModel):
    """A prompt token in TGI's `details.prefill` (decoder_input_details): the first one's logprob is null."""

    id: int
    text: str
    logprob: float | None


class StreamDetails(BaseModel):
    finish_reason: Literal["length", "eos_token", "stop_sequence"]
    generated_tokens: int
    prompt_tokens: int
    seed: int | None
    adapter_version: str | None = None  # ours, not TGI's (its clients ignore it): the version that answered


class AnswerDetails(BaseModel):
    """One answer's details, as TGI's `details` and its `best_of_sequences` both carry them."""

    finish_reason: Literal["length", "eos_token", "stop_sequence"]
    generated_tokens: int
    seed: int | None
    prefill: list[PrefillToken] = []  # the prompt's tokens, with decoder_input_details
    tokens: list[Token] = []
    top_tokens: list[list[Token]] | None = None  # per token, its top_n_tokens alternatives (when asked)


class BestOfSequence(AnswerDetails):
    generated_text: str


class Details(StreamDetails, AnswerDetails):
    best_of_sequences: list[BestOfSequence] | None = None  # best_of: the answers not chosen (left out when none)


class GenerateResponse(BaseModel):
    generated_text: str
    details: Details | None = None


class StreamResponse(BaseModel):
    index: int
    token: Token
    top_tokens: list[Token] | None = None  # its top_n_tokens alternatives (when asked)
    generated_text: str | None = None
    details: StreamDetails | None = None


# ---- OpenAI -------------------------------------------------------------------------------------

class _OpenAIBase(_Lenient):
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool | None = False
    repetition_penalty: float | None = None  # common extension (vLLM, TGI)
    top_k: int | None = None  # common extension (vLLM, TGI); vLLM's clients send -1 (and 0) for "off"
    ignore_eos: bool | None = False  # vLLM's extension: generate max_tokens whatever the model says
    stream_options: dict | None = None  # {"include_usage": true}: a last chunk with the usage
    skip_special_tokens: bool | None = True  # vLLM's: False keeps the special tokens' text in the output
    include_stop_str_in_output: bool | None = False  # vLLM's: the text keeps the stop sequence it ended on
    adapter_task: int | None = None  # ours (extra body): which task of a multitask prompt tuning adapter
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None  # token id (as a string, as OpenAI's) -> bias in [-100, 100]
    min_p: float | None = None  # vLLM's extension
    min_tokens: int | None = None  # vLLM's extension: no stop of any kind before this many tokens
    stop_token_ids: list[int] | None = None  # vLLM's extension
    soft_prompt: str | None = None  # ours: base64 safetensors [n, hidden], this request's own virtual tokens
    response_format: dict | None = None  # {"type": "text" | "json_object" | "json_schema", "json_schema": {...}}
    n: int | None = None  # answers returned per prompt
    best_of: int | None = None  # answers generated per prompt (>= n); the n most likely per token are returned

    def grammar_spec(self) -> GrammarSpec | None:
        """The structured output `response_format` asks for, or None."""
        return _response_format(self.response_format, "response_format")

    def answers(self) -> Answers:
        """How many answers to generate and return per prompt (OpenAI's rules: best_of >= n, and only n
        is streamed)."""
        n = _count("n", self.n)
        best_of = _count("best_of", self.best_of) if self.best_of is not None else n
        if best_of < n:
            raise InvalidRequest("best_of", f"must be at least n ({n}), got {best_of}")
        if best_of > n and self.stream:
            raise InvalidRequest("best_of", "cannot be streamed: with stream, best_of must equal n (or be left out)")
        return Answers(n, best_of, "best_of" if best_of > n else "n")

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))

    def _params(self, max_tokens: int | None, default_max_new_tokens: int, route: str,
                unknown: tuple[str, ...] | list[str] = (), top_logprobs: int = 0) -> SamplingParams:
        unknown = self.check_fields() + list(unknown)
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        temperature = 1.0 if self.temperature is None else self.temperature
        params = SamplingParams(
            max_new_tokens=max_tokens if max_tokens is not None else default_max_new_tokens,
            do_sample=temperature > 0,  # OpenAI: temperature 0 is greedy, anything else samples
            temperature=temperature,
            top_p=self.top_p,
            top_k=None if self.top_k in (-1, 0) else self.top_k,
            repetition_penalty=self.repetition_penalty,
            seed=self.seed,
            stop=tuple(stop),
            ignore_eos=bool(self.ignore_eos),
            skip_special_tokens=self.skip_special_tokens is not False,
            frequency_penalty=self.frequency_penalty or 0.0,
            presence_penalty=self.presence_penalty or 0.0,
            logit_bias=_logit_bias(self.logit_bias),
            min_p=self.min_p or 0.0,
            min_tokens=self.min_tokens or 0,
            stop_token_ids=tuple(self.stop_token_ids or ()),
            top_logprobs=top_logprobs,
        )
        _log_unknown(route, unknown)
        return params


@dataclasses.dataclass(frozen=True)
class Answers:
    """Answers per prompt: `generated` run (the prompt computed once), the `returned` most likely per
    token kept; `param` names the field that set `generated`, for errors."""

    returned: int
    generated: int
    param: str


def _count(param: str, value: int | None) -> int:
    if value is None:
        return 1
    if isinstance(value, bool) or value < 1:
        raise InvalidRequest(param, f"must be a positive integer, got {value!r}")
    return value


def _response_format(fmt: dict | None, param: str) -> GrammarSpec | None:
    """OpenAI's `response_format` (and LoRAX's, whose json_object may carry a `schema`)."""
    kind = None if fmt is None else fmt.get("type")
    if kind in (None, "text"):
        return None
    if kind == "json_object":
        return GrammarSpec.json_schema(fmt.get("schema") or {"type": "object"}, param + ".schema")
    if kind == "json_schema":
        inner = fmt.get("json_schema")
        if not isinstance(inner, dict):
            raise InvalidRequest(param + ".json_schema", "must be an object with the schema in `schema`")
        schema = inner.get("schema", inner.get("schema_"))  # schema_: older openai clients' alias
        return GrammarSpec.json_schema({"type": "object"} if schema is None else schema, param + ".json_schema.schema")
    raise InvalidRequest(param + ".type", f"{kind!r} is not supported (accepted: 'text', 'json_object', 'json_schema')")


def _logit_bias(bias: dict[str, float] | None) -> tuple[tuple[int, float], ...]:
    """OpenAI's {"token id": bias} as (id, bias) pairs (SamplingParams checks the ranges)."""
    pairs = []
    for key, value in (bias or {}).items():
        try:
            pairs.append((int(key), float(value)))
        except ValueError:
            raise InvalidRequest("logit_bias", f"keys must be token ids, got {key!r}") from None
    return tuple(pairs)


def _top_logprobs(param: str, k: int | None) -> int:
    """The alternatives asked for per token, refused under its route's own name when out of range."""
    if k is not None and not 0 <= k <= MAX_TOP_LOGPROBS:
        raise InvalidRequest(param, f"must be in [0, {MAX_TOP_LOGPROBS}], got {k!r}")
    return k or 0


class CompletionRequest(_OpenAIBase):
    UNSUPPORTED = _COMPLETION_UNSUPPORTED

    prompt: str | list[str] | list[int] | list[list[int]] | None = None  # required, unless prompt_embeds is given
    suffix: str | None = None  # refused: the models served are causal
    prompt_embeds: str | None = None  # vLLM's: base64 torch.save [n, hidden], with --allow-prompt-embeds only

    logprobs: int | None = None  # the chosen tokens' log-probabilities and this many alternatives each
    echo: bool | None = False  # the prompt before the completion (with logprobs: its tokens' logprobs first)

    @property
    def prompt_only(self) -> bool:
        """max_tokens 0 with echo: the prompt (and its logprobs) alone, as vLLM answers it."""
        return bool(self.echo) and self.max_tokens == 0

    def to_sampling_params(self, default_max_new_tokens: int) -> SamplingParams:
        if self.suffix:
            raise InvalidRequest("suffix", "text after the completion (insertion) is not supported: the models "
                                 "served here are causal and only continue the prompt")
        max_tokens = 1 if self.prompt_only else self.max_tokens  # that token is run, not answered
        params = self._params(max_tokens if max_tokens is not None else 16, default_max_new_tokens,
                              "completions", top_logprobs=_top_logprobs("logprobs", self.logprobs))
        return dataclasses.replace(params, prompt_logprobs=True) if self.echo and self.logprobs is not None else params


class ChatMessage(_Lenient):
    UNSUPPORTED = _MESSAGE_UNSUPPORTED

    role: str
    content: str | list[dict] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):  # OpenAI content parts: only text parts are understood
            parts = []
            for part in self.content:
                if part.get("type") != "text":
                    raise InvalidRequest("messages.content", f"content part type {part.get('type')!r} is not supported")
                parts.append(part.get("text", ""))
            return "".join(parts)
        return self.content or ""


class ChatCompletionRequest(_OpenAIBase):
    UNSUPPORTED = _CHAT_UNSUPPORTED

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool | None = False  # the chosen tokens' log-probabilities
    top_logprobs: int | None = None  # and this many alternatives each (needs logprobs)

    def to_sampling_params(self, default_max_new_tokens: int) -> SamplingParams:
        limit = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        in_messages = sorted({name for m in self.messages for name in m.check_fields("messages[].")})
        if self.top_logprobs and not self.logprobs:
            raise InvalidRequest("top_logprobs", "needs logprobs: true")
        return self._params(limit, default_max_new_tokens, "chat", in_messages,
                            top_logprobs=_top_logprobs("top_logprobs", self.top_logprobs))


# ---- tokenizing (routes_tokenize) ------------------------------------------------------------------

class TgiTokenizeParameters(BaseModel):
    model_config = ConfigDict(extra="ignore")  # TGI's clients send the generation parameters too

    adapter_id: str | None = None


class TgiTokenizeRequest(BaseModel):
    inputs: str
    parameters: TgiTokenizeParameters = Field(default_factory=TgiTokenizeParameters)


class VllmTokenizeRequest(BaseModel):
    """vLLM's two tokenize bodies in one: `prompt` (completions) or `messages` (chat)."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None  # vLLM's default: true for a prompt, false for messages
    add_generation_prompt: bool | None = True
    return_token_strs: bool | None = False


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    tokens: list[int]
