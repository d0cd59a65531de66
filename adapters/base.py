"""The one interface every adapter kind implements, and the registry of kinds by `peft_type`.

Every kind ends as the same thing: a table of `num_virtual_tokens` rows (what PEFT saves as
`prompt_embeddings`) that materializes into a per-layer key/value prefix. Kinds differ only in
the width of that table, the encoder that produces it from a training checkpoint, and whether the
rows are input embeddings (run through the frozen model once) or key/value vectors already.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch

from .errors import InvalidAdapter
from .spec import ModelSpec


class AdapterKind(ABC):
    peft_type: ClassVar[str]
    rows_are_embeddings: ClassVar[bool]  # True: rows are input embeddings; False: key/value vectors
    # Names PEFT's saved file gives encoder weights, where they are not the encoder's own (multitask
    # prompt tuning saves its shared embedding as `prompt_embeddings`, which other kinds use for the table)
    saved_names: ClassVar[dict[str, str]] = {}

    @abstractmethod
    def table_width(self, spec: ModelSpec) -> int:
        """Width of one row of the materialized table for this base model."""

    @abstractmethod
    def encoder_sizes(self, config: dict) -> dict[str, int]:
        """The fields of `adapter_config.json` the encoder's parameter shapes derive from, checked
        (defaults filled in), e.g. {"num_virtual_tokens": 7, "token_dim": 64, "encoder_hidden_size": 32}."""

    @abstractmethod
    def encoder_shapes(self, config: dict) -> dict[str, tuple[int, ...]]:
        """The shape of every parameter of `encoder(config)`, by state-dict name, computed without
        building it: the weights file is checked against these before anything is allocated."""

    @abstractmethod
    def encoder(self, config: dict) -> torch.nn.Module:
        """PEFT's encoder for this kind; its forward maps token indices [n] to the table [n, width]."""

    def check_config(self, config: dict, spec: ModelSpec) -> None:
        """Kind-specific checks of `adapter_config.json` against the base model."""

    def tasks(self, config: dict) -> int | None:
        """How many tasks the adapter holds, each its own table (a request names one: its
        `adapter_task`); None for kinds without tasks, whose encoder takes token indices alone.
        With tasks, the encoder's forward is `(indices, task)`."""
        return None


class EmbeddingKind(AdapterKind):
    """Kinds whose rows are virtual-token input embeddings (prompt tuning, p-tuning)."""

    rows_are_embeddings = True

    def table_width(self, spec: ModelSpec) -> int:
        return spec.hidden_size

    def check_config(self, config: dict, spec: ModelSpec) -> None:
        check_matches(config, "token_dim", spec.hidden_size, "hidden size")
        check_matches(config, "num_layers", spec.num_layers, "number of layers")
        # PEFT records the attention heads here; ModelSpec knows the key/value heads, of which the
        # attention heads are a multiple (GQA), and no model has more heads than hidden units.
        heads = config.get("num_attention_heads")
        if heads is not None:
            heads = config_int(config, "num_attention_heads")
            if heads % spec.num_kv_heads or heads > spec.hidden_size:
                raise InvalidAdapter(
                    f"adapter_config.json: num_attention_heads={heads} does not fit the base model, whose "
                    f"attention heads are a multiple of its {spec.num_kv_heads} key/value heads and at most "
                    f"its hidden size {spec.hidden_size}"
                )


KINDS: dict[str, AdapterKind] = {}


def register_kind(kind: AdapterKind) -> AdapterKind:
    KINDS[kind.peft_type] = kind
    return kind


def kind_for(peft_type) -> AdapterKind:
    if not isinstance(peft_type, str) or peft_type not in KINDS:
        raise InvalidAdapter(
            f"unsupported peft_type {peft_type!r}; supported: {', '.join(sorted(KINDS))}"
        )
    return KINDS[peft_type]


def config_int(config: dict, key: str, default: int | None = None, minimum: int = 1) -> int:
    """An integer field of adapter_config.json, checked."""
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidAdapter(f"adapter_config.json: {key} must be an integer >= {minimum}, got {value!r}")
    return value


def linear_shapes(prefix: str, layers: list[tuple[int, int, int]]) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of the `torch.nn.Linear(inputs, outputs)` at each (index, inputs, outputs) of a Sequential."""
    shapes = {}
    for index, inputs, outputs in layers:
        shapes[f"{prefix}.{index}.weight"] = (outputs, inputs)
        shapes[f"{prefix}.{index}.bias"] = (outputs,)
    return shapes


def check_matches(config: dict, key: str, expected: int, what: str) -> None:
    """PEFT records the base model's sizes in the config; a recorded size must match ours."""
    value = config.get(key)
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value != expected):
        raise InvalidAdapter(
            f"adapter_config.json: {key}={value!r} does not fit the base model, whose {what} is {expected}"
        )
