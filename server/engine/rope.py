"""Length-dependent rotary embeddings (dynamic NTK, longrope) in a packed step: each request's own.

transformers' dynamic and longrope types pick their frequencies from the sequence's length
(`dynamic_rope_update` in transformers.modeling_rope_utils): the largest position id in the
forward, plus one. In a packed step (every request's tokens back to back, position ids
restarting per request) that is the longest request's length, so a short request packed beside
a long one would be rotated for the long one's length; the module also keeps the frequencies of
the longest length it has seen from one call to the next. Here each request gets the cos/sin
transformers gives it when it runs alone: transformers' own update and forward, run per request
on a fresh copy of the module's state (`_Fresh`), so nothing carries over between steps. A
request's length is its KV length after this forward, or, while its prompt is computed in
chunks, the length its prompt will reach (`RaggedStep.rope_lens`): transformers computes a
prompt's frequencies once, for its whole length.

Static types (default, linear, llama3, yarn, ...) are left alone: `install` wraps nothing and
`cos_sin` calls the module as it is.

What of transformers this relies on (its internals are touched in this file only), guarded by
tests/unit/test_rope.py::test_packed_dynamic_rope_equals_each_request_alone (and ::..._chunked_prompt):
- `dynamic_rope_update` wrapping the rotary module's forward, which reads the length as
  `position_ids.max() + 1` and keeps its state in attributes of the module (`inv_freq`,
  `max_seq_len_cached`, `long_inv_freq`, per layer type with a `{layer_type}_` prefix);
- a module's original frequencies serving every length up to `original_max_seq_len` (dynamic) or
  the rope parameters' `original_max_position_embeddings` (longrope): requests up to it share one call.
Not matched: a prompt-tuning adapter's prefix is materialized once, rotated for its own length,
while PEFT rotates the virtual tokens for the whole request's length; they differ once a request
outgrows the module's original length.
"""

from __future__ import annotations

import contextlib
import itertools
import weakref
from contextvars import ContextVar

import torch
from transformers.modeling_rope_utils import dynamic_rope_update

_UPDATE = dynamic_rope_update(lambda self, x, position_ids: None).__code__  # the code of its wrapper, for any forward
_STEP: ContextVar = ContextVar("softprompt_packed_step", default=None)  # the RaggedStep being run, inside `packed`


def length_dependent(rope_type: str | None) -> bool:
    """Whether transformers recomputes this type's frequencies from the length (as `dynamic_rope_update` decides)."""
    return rope_type is not None and ("dynamic" in rope_type or rope_type == "longrope")


def served_positions(config, positions: int) -> int:
    """The positions served for a model of `positions` max_position_embeddings: dynamic scaling
    stretches them by its factor, as vLLM and TGI serve it (with several layer types, the least)."""
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    groups = list(params.values()) if params and all(isinstance(v, dict) for v in params.values()) else [params]
    factors = [float(p.get("factor") or 1.0) if "dynamic" in str(p.get("rope_type", "")) else 1.0 for p in groups]
    return int(positions * min(factors, default=1.0))


class _PackedRope:
    """One length-dependent rotary module: transformers' forward outside a packed step, per request inside."""

    def __init__(self, module: torch.nn.Module, types: dict[str | None, str]):
        self.module = module
        self.forward = type(module).forward  # the class's, decorated: update, then compute
        self.plain = module.forward  # bound, as transformers calls it
        self.limits = {layer_type: _original_length(module, layer_type, t) for layer_type, t in types.items()}

    def __call__(self, x, position_ids, layer_type=None):
        step = _STEP.get()
        if step is None:
            return self.plain(x, position_ids) if layer_type is None else self.plain(x, position_ids, layer_type)
        return self.per_request(x, position_ids, step, layer_type)

    def per_request(self, x, position_ids, step, layer_type=None):
        """cos, sin [1, tokens, dim]: each request's tokens rotated for its own length. position_ids:
        [1, tokens], each request's tokens in packing order (a padded step's extra rows last)."""
        limit = self.limits.get(layer_type)
        if limit is None:  # this layer type's frequencies do not depend on the length
            return self.plain(x, position_ids) if layer_type is None else self.plain(x, position_ids, layer_type)
        lengths = step.rope_lens or step.kv_lens
        ends = list(itertools.accumulate(step.q_lens))
        pieces, run_from = [], 0  # requests within the limit run together, in contiguous runs
        for end, q, kv, length in zip(ends, step.q_lens, step.kv_lens, lengths):
            if length <= limit:
                continue
            start = end - q
            if run_from < start:
                pieces.append(self._alone(x, position_ids[:, run_from:start], layer_type))
            positions = position_ids[:, start:end]
            if length > kv:  # a prompt's chunk: rotated for the prompt's whole length, read from its last position
                last = torch.full((1, 1), length - 1, dtype=positions.dtype, device=positions.device)
                cos, sin = self._alone(x, torch.cat([positions, last], dim=1), layer_type)
                pieces.append((cos[:, :-1], sin[:, :-1]))
            else:
                pieces.append(self._alone(x, positions, layer_type))
            run_from = end
        if not pieces:
            return self._alone(x, position_ids, layer_type)
        if run_from < position_ids.shape[1]:
            pieces.append(self._alone(x, position_ids[:, run_from:], layer_type))
        return torch.cat([c for c, _ in pieces], dim=1), torch.cat([s for _, s in pieces], dim=1)

    def _alone(self, x, position_ids, layer_type):
        """transformers' forward as on a module just built: its update writes into a fresh state."""
        fresh = _Fresh(self.module, layer_type)
        if layer_type is None:
            return self.forward(fresh, x, position_ids)
        return self.forward(fresh, x, position_ids, layer_type)


class _Fresh:
    """A rotary module's state as at its construction, reading everything else from the module;
    transformers' length update sets and registers its attributes here, not on the module."""

    def __init__(self, module: torch.nn.Module, layer_type: str | None):
        prefix = f"{layer_type}_" if layer_type else ""
        self._module = module
        setattr(self, f"{prefix}inv_freq", getattr(module, f"{prefix}original_inv_freq").clone())  # longrope copies into it
        self.max_seq_len_cached = module.original_max_seq_len
        if prefix:
            setattr(self, f"{prefix}max_seq_len_cached", module.original_max_seq_len)

    def __getattr__(self, name):
        return getattr(self._module, name)

    def register_buffer(self, name, tensor, persistent=True):
        setattr(self, name, tensor)


def _original_length(module, layer_type: str | None, rope_type: str) -> int:
    """The longest length the module's original frequencies serve: no request up to it needs its own."""
    if "dynamic" in rope_type:
        return module.original_max_seq_len
    if rope_type == "longrope":
        params = module.config.rope_parameters
        return (params[layer_type] if layer_type else params)["original_max_position_embeddings"]
    return 0  # unknown: every request its own call


def _rope_types(module) -> dict[str | None, str]:
    """A rotary module's length-dependent rope types, by layer type (None: one for all layers)."""
    rope_type = getattr(module, "rope_type", None)
    types = rope_type if isinstance(rope_type, dict) else {None: rope_type}
    return {k: t for k, t in types.items() if isinstance(t, str) and length_dependent(t)}


def _updates_with_length(cls) -> bool:
    forward = getattr(cls, "forward", None)
    while forward is not None:
        if getattr(forward, "__code__", None) is _UPDATE:
            return True
        forward = getattr(forward, "__wrapped__", None)
    return False


_INSTALLED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # rotary module -> its _PackedRope


def install(model) -> bool:
    """Make the model's length-dependent rotary modules compute per request inside `packed` (the
    model's own forward calls them there); returns whether it has any. ValueError for one whose
    frequencies depend on the length by other means than transformers' `dynamic_rope_update`."""
    found = False
    for module in model.modules():
        types = _rope_types(module)
        if not types:
            continue
        if not _updates_with_length(type(module)):
            raise ValueError(f"{type(module).__name__} computes its {', '.join(sorted(set(types.values())))} "
                             "rotary frequencies in its own way, which the packed step cannot give each "
                             "request; this model is not supported")
        if module not in _INSTALLED:
            packed_rope = _INSTALLED[module] = _PackedRope(module, types)
            module.forward = torch.compiler.disable(packed_rope)  # a graph break under torch.compile, as attention
        found = True
    return found


@contextlib.contextmanager
def packed(step):
    """Inside: the installed rotary modules compute per request of `step` (an attention.RaggedStep)."""
    token = _STEP.set(step)
    try:
        yield
    finally:
        _STEP.reset(token)


def cos_sin(rotary, x: torch.Tensor, position_ids: torch.Tensor, step) -> tuple[torch.Tensor, torch.Tensor]:
    """The rotary module's cos, sin [1, tokens, dim] for a packed step; x: [..., hidden] (its dtype
    and device are the output's), position_ids: [1, tokens]. For `LeanForward`."""
    packed_rope = _INSTALLED.get(rotary)
    if packed_rope is None:
        return rotary(x, position_ids)
    return packed_rope.per_request(x, position_ids, step)
