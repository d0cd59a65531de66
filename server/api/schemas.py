"""HTTP request and response bodies (pydantic). Engine types stay in server/engine; the
`to_sampling_params()` methods are the one bridge between them.

Clients of TGI, LoRAX and OpenAI send every parameter they know, many as null or false: those
are accepted at their defaults, and a value this server cannot honour is refused naming it.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from adapters.sources import SOURCES
from server.engine.request import InvalidRequest, SamplingParams

# Parameters accepted only at their "off" value: name -> values that mean off.
_OFF_VALUES = {
    "best_of": (None, 1),
    "decoder_input_details": (None, False),
    "watermark": (None, False),
    "top_n_tokens": (None, 0),
    "typical_p": (None, 1.0),
    "frequency_penalty": (None, 0.0),
    "presence_penalty": (None, 0.0),
    "grammar": (None,),
    "response_format": (None,),
    "adapter_parameters": (None,),
    "merged_adapters": (None,),
    "logit_bias": (None, {}),
    "suffix": (None, ""),
    "n": (None, 1),
    "echo": (None, False),
    "tools": (None, []),
    "logprobs": (None, False, 0),
    "top_logprobs": (None, 0),
}


def _refuse_unsupported(values: dict[str, Any], prefix: str = "") -> None:
    for name, off in _OFF_VALUES.items():
        if name in values and values[name] not in off:
            raise InvalidRequest(prefix + name, f"{values[name]!r} is not supported by this server")


class _Lenient(BaseModel):
    """Unknown client fields are kept (in `model_dump()`), so `_OFF_VALUES` can check them undeclared."""

    model_config = ConfigDict(extra="allow")


class GenerateParameters(_Lenient):
    adapter_id: str | None = None
    adapter_source: str | None = None  # LoRAX's: where an unknown adapter comes from; null: "local"
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

    def to_sampling_params(self, default_max_new_tokens: int) -> SamplingParams:
        _refuse_unsupported(self.model_dump(), "parameters.")
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
        )


class GenerateRequest(_Lenient):
    inputs: str
    parameters: GenerateParameters = Field(default_factory=GenerateParameters)
    stream: bool | None = False


class Token(BaseModel):
    id: int
    text: str
    logprob: float | None
    special: bool


class StreamDetails(BaseModel):
    finish_reason: Literal["length", "eos_token", "stop_sequence"]
    generated_tokens: int
    prompt_tokens: int
    seed: int | None
    adapter_version: str | None = None  # ours, not TGI's (its clients ignore it): the version that answered


class Details(StreamDetails):
    prefill: list[Token] = []
    tokens: list[Token] = []


class GenerateResponse(BaseModel):
    generated_text: str
    details: Details | None = None


class StreamResponse(BaseModel):
    index: int
    token: Token
    top_tokens: None = None
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
    top_k: int | None = None  # common extension (vLLM, TGI)
    ignore_eos: bool | None = False  # vLLM's extension: generate max_tokens whatever the model says
    stream_options: dict | None = None  # {"include_usage": true}: a last chunk with the usage

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))

    def _params(self, max_tokens: int | None, default_max_new_tokens: int) -> SamplingParams:
        _refuse_unsupported(self.model_dump())
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        temperature = 1.0 if self.temperature is None else self.temperature
        return SamplingParams(
            max_new_tokens=max_tokens if max_tokens is not None else default_max_new_tokens,
            do_sample=temperature > 0,  # OpenAI: temperature 0 is greedy, anything else samples
            temperature=temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            repetition_penalty=self.repetition_penalty,
            seed=self.seed,
            stop=tuple(stop),
            ignore_eos=bool(self.ignore_eos),
        )


class CompletionRequest(_OpenAIBase):
    prompt: str | list[str]

    def to_sampling_params(self, default_max_new_tokens: int) -> SamplingParams:
        return self._params(self.max_tokens if self.max_tokens is not None else 16, default_max_new_tokens)


class ChatMessage(_Lenient):
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
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None

    def to_sampling_params(self, default_max_new_tokens: int) -> SamplingParams:
        limit = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        return self._params(limit, default_max_new_tokens)
