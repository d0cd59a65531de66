"""Structured output in the engine (server/engine/grammar.py): the bitmask unpacks to the tokens the
matcher allows, a JSON schema or regex constrains every adapter kind to a valid answer, EOS only
where the grammar accepts, preemption keeps the matcher, compile errors name the parameter."""

from __future__ import annotations

import json
import re

import pytest
import torch

from server.engine import grammar
from server.engine.grammar import Grammars, GrammarSpec
from server.engine.request import FinishReason, InvalidRequest, SamplingParams, Sequence
from tests.conftest import PEFT_TYPES, PROMPTS

SCHEMA = {"type": "object", "properties": {"label": {"enum": ["yes", "no", "maybe"]},
                                           "score": {"type": "integer", "minimum": 0, "maximum": 9}},
          "required": ["label", "score"], "additionalProperties": False}


def _grammars(w) -> Grammars:
    from server.engine.engine import _eos_ids
    return Grammars(w.tokenizer, grammar.vocab_size(w.model), _eos_ids(w.model, w.tokenizer))


def _drain(engine, max_steps=500):
    for _ in range(max_steps):
        if not engine.has_work():
            return
        engine.step()
    raise AssertionError("the engine does not finish")


def _valid(text: str) -> dict:
    obj = json.loads(text)
    assert set(obj) == {"label", "score"} and obj["label"] in ("yes", "no", "maybe") and 0 <= obj["score"] <= 9
    return obj


def test_unpack_matches_bits():
    bitmask = torch.tensor([[0b1011, -1], [-(1 << 31), 0]], dtype=torch.int32)  # [2 rows, 2 words]
    allowed = grammar.unpack(bitmask, 40)
    assert allowed.shape == (2, 40)
    assert allowed[0].nonzero().flatten().tolist() == [0, 1, 3] + list(range(32, 40))
    assert allowed[1].nonzero().flatten().tolist() == [31]


def test_apply_leaves_unconstrained_batches_alone(llama):
    logits = torch.randn(3, 300)
    batch = [Sequence([1], SamplingParams()) for _ in range(3)]
    assert grammar.apply(logits, batch) is logits


def test_apply_masks_only_constrained_rows(llama):
    g = _grammars(llama).compile(GrammarSpec.regex("[0-9]+", "grammar"))
    logits = torch.randn(3, grammar.vocab_size(llama.model))
    batch = [Sequence([1], SamplingParams()) for _ in range(3)]
    batch[1].constraint = g.constraint()
    before = logits.clone()
    out = grammar.apply(logits, batch)
    assert torch.equal(out[0], before[0]) and torch.equal(out[2], before[2])
    allowed = torch.isfinite(out[1]).nonzero().flatten().tolist()
    assert [llama.tokenizer.decode([t]) for t in allowed] == [str(d) for d in range(10)]


@pytest.mark.parametrize("variant", [None, *PEFT_TYPES])
def test_json_schema_every_adapter_kind(llama, variant):
    grammars = _grammars(llama)
    engine = llama.engine(max_batch_size=8)
    compiled = grammars.compile(GrammarSpec.json_schema(SCHEMA, "response_format"))
    seqs = []
    for i, prompt in enumerate(["Hi", "the quick brown fox jumps", "Answer:"]):
        params = SamplingParams(max_new_tokens=60, do_sample=i > 0, temperature=1.0, seed=i)
        seq = Sequence(llama.ids(prompt), params, llama.adapter(variant), constraint=compiled.constraint())
        seqs.append(engine.submit(seq))
    seqs.append(engine.submit(Sequence(llama.ids("Hi"), SamplingParams(max_new_tokens=5), llama.adapter(variant))))
    _drain(engine)
    for seq in seqs[:3]:
        assert seq.finish_reason == FinishReason.EOS, seq.text
        _valid(seq.text)
    assert seqs[3].finish_reason is not None and seqs[3].constraint is None


def test_regex_and_eos_only_where_accepting(llama):
    grammars = _grammars(llama)
    engine = llama.engine()
    eos = next(iter(engine.eos_ids))
    g = grammars.compile(GrammarSpec.regex(r"[a-c]{2,4}(-[0-9])?", "grammar"))
    seqs = [engine.submit(Sequence(llama.ids("Hi"), SamplingParams(max_new_tokens=20, do_sample=True, seed=s),
                                   constraint=g.constraint())) for s in range(6)]
    _drain(engine)
    for seq in seqs:
        assert re.fullmatch(r"[a-c]{2,4}(-[0-9])?", seq.text), seq.text
        assert seq.finish_reason == FinishReason.EOS
        assert eos not in seq.output_ids[:2]  # too short to accept: EOS was masked


def test_length_is_reported_when_the_grammar_is_not_done(llama):
    grammars = _grammars(llama)
    engine = llama.engine()
    g = grammars.compile(GrammarSpec.regex("[a-z]{30}", "grammar"))
    seq = engine.submit(Sequence(llama.ids("Hi"), SamplingParams(max_new_tokens=5), constraint=g.constraint()))
    _drain(engine)
    assert seq.finish_reason == FinishReason.LENGTH and re.fullmatch("[a-z]{5}", seq.text)


def test_preemption_keeps_the_matcher(llama):
    """12 requests, each past its segment's first growth, in a pool that holds 3 of them whole: preempted ones are recomputed and go on
    where they were, each with the tokens it makes alone."""
    from server.engine.kv_cache import KVPool, most_slots

    g = _grammars(llama).compile(GrammarSpec.regex("[a-z]{40}", "grammar"))

    def requests():
        return [Sequence(llama.ids(PROMPTS[s % 2]), SamplingParams(max_new_tokens=40, do_sample=True, seed=s),
                         llama.adapter(variant), constraint=g.constraint())
                for s, variant in enumerate([None, *PEFT_TYPES] * 2)]

    seqs = requests()
    spec = llama.spec
    slot = KVPool.slot_bytes(spec.num_layers, spec.num_kv_heads, spec.head_dim, spec.dtype)
    engine = llama.engine(kv_cache_bytes=3 * max(most_slots(s) for s in seqs) * slot)
    for seq in seqs:
        engine.submit(seq)
    _drain(engine, 3000)
    assert sum(s.preemptions for s in seqs) > 0, "nothing was preempted: the test proves nothing"
    for seq, alone in zip(seqs, requests()):
        engine = llama.engine()
        engine.submit(alone)
        _drain(engine)
        assert seq.finish_reason == FinishReason.EOS and re.fullmatch("[a-z]{40}", seq.text), seq.text
        assert seq.output_ids == alone.output_ids


@pytest.mark.parametrize("spec, words", [
    (GrammarSpec.json_schema({"type": "strange"}, "response_format.json_schema.schema"), "strange"),
    (GrammarSpec.json_schema({"$ref": "#/nowhere"}, "parameters.grammar.value"), "nowhere"),
    (GrammarSpec.regex("([a-z", "parameters.grammar.value"), "unclosed"),
])
def test_invalid_grammar_names_the_parameter(llama, spec, words):
    with pytest.raises(InvalidRequest) as err:
        _grammars(llama).compile(spec)
    assert err.value.param == spec.param and words in str(err.value)


def test_spec_refuses_non_schemas():
    with pytest.raises(InvalidRequest, match="not valid JSON"):
        GrammarSpec.json_schema("{nope", "p")
    with pytest.raises(InvalidRequest, match="must be an object"):
        GrammarSpec.json_schema([1], "p")
    with pytest.raises(InvalidRequest, match="non-empty"):
        GrammarSpec.regex("", "p")


def test_compiled_grammars_are_cached_and_bounded(llama):
    grammars = _grammars(llama)
    grammars._cache_size = 2
    a = GrammarSpec.json_schema(SCHEMA, "p")
    first = grammars.compile(a)
    assert grammars.compile(GrammarSpec.json_schema(json.dumps(SCHEMA), "p"))._template is first._template
    for n in range(3):
        grammars.compile(GrammarSpec.regex(f"x{n}", "p"))
    assert len(grammars._cache) == 2 and a not in grammars._cache
