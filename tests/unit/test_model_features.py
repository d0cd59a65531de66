"""Model features one at a time (tests/factory.py FEATURES): Qwen2's q/k/v biases, Llama's attention and
MLP biases, tied and untied embeddings, RoPE scaling (linear, dynamic, llama3, yarn).

For each: the engine's greedy tokens, its requests batched (with and without an adapter), equal
transformers' and PEFT's (`tests.oracle`), under every path this machine runs; the adapter changes
the tokens; and removing the feature from transformers' model changes them too, so a forward that
dropped it would be seen.
"""

from __future__ import annotations

import tempfile
from functools import cache
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from server.engine.engine import Engine
from server.engine.request import SamplingParams, Sequence
from tests.conftest import MAX_NEW, PROMPTS
from tests.factory import FEATURES

NAMES = list(FEATURES)


class Feature:
    """One feature's tiny model, loaded through the server's path, and its one adapter."""

    def __init__(self, root: Path, name: str):
        from adapters import AdapterRegistry
        from server.model import load_base_model
        from tests.factory import make_adapter, make_model

        self.name = name
        self.variant = FEATURES[name][2]
        self.model_dir = make_model(root, name)
        self.adapter_dir = make_adapter(self.model_dir, root / f"{name}-{self.variant}", self.variant)
        self.base = load_base_model(str(self.model_dir), dtype="float32")
        self.adapter = AdapterRegistry(self.base.spec, self.base.model).add_dir(self.variant, self.adapter_dir, "test")
        self.prompts = [self.base.tokenizer(text).input_ids for text in PROMPTS]

    @cache  # noqa: B019 (one Feature per name, kept for the module)
    def reference(self, variant: str | None, prompt: tuple[int, ...]) -> list[int]:
        """PEFT's greedy tokens (transformers' for variant None), live or golden: `tests.oracle.expected`."""
        from tests import oracle
        from tests.factory import peft_greedy

        adapter_dir = self.adapter_dir if variant else None
        return oracle.expected(self.name, variant, list(prompt), MAX_NEW, self.model_dir, adapter_dir,
                               live=lambda: peft_greedy(self.model_dir, adapter_dir, list(prompt), MAX_NEW))


@pytest.fixture(scope="module")
def features():
    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="features-"))
    built: dict[str, Feature] = {}

    def get(name: str) -> Feature:
        if name not in built:
            built[name] = Feature(root, name)
        return built[name]

    return get


@pytest.mark.parametrize("name", NAMES)
def test_batched_greedy_tokens_equal_transformers_and_peft(features, name, paths):
    f = features(name)
    engine = Engine(f.base.model, f.base.tokenizer, f.base.spec, paths=paths)
    assert (engine.runner.lean is not None) == paths.enabled, "the written-out forward should take every feature"
    cases = [(variant, tuple(p)) for p in f.prompts for variant in (None, f.variant)]
    seqs = [engine.submit(Sequence(list(p), SamplingParams(max_new_tokens=MAX_NEW), f.adapter if v else None))
            for v, p in cases]
    while engine.has_work():  # all four requests in each step
        engine.step()
    for (variant, prompt), seq in zip(cases, seqs):
        assert seq.output_ids == f.reference(variant, prompt), f"{name}/{variant or 'base'} prompt {list(prompt)}"


@pytest.mark.parametrize("name", NAMES)
def test_the_adapter_changes_the_tokens(features, name):
    f = features(name)
    for prompt in map(tuple, f.prompts):
        assert f.reference(f.variant, prompt) != f.reference(None, prompt), f"{name}: {f.variant} changes nothing"


def _without(f: Feature, part: str):
    """transformers' model of `f` without `part`: biases at 0, norm scales at 1, or RoPE unscaled."""
    if part == "rope":
        model = AutoModelForCausalLM.from_pretrained(f.model_dir, rope_parameters=dict(rope_type="default",
                                                                                       rope_theta=10000.0))
        assert model.model.rotary_emb.rope_type == "default"
        return model.eval()
    model = AutoModelForCausalLM.from_pretrained(f.model_dir).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if part == "bias" and name.endswith("bias"):
                param.zero_()
            elif part == "norm" and name.endswith("norm.weight"):
                param.fill_(1.0)
    return model


WITHOUT = {"qwen2": ["bias", "norm"], "llama-bias": ["bias", "norm"], "llama-rope-linear": ["rope"],
           "llama-rope-dynamic": ["rope"], "llama-rope-llama3": ["rope"], "llama-rope-yarn": ["rope"]}


@pytest.mark.parametrize("name, part", [(name, part) for name, parts in WITHOUT.items() for part in parts])
def test_the_feature_changes_the_tokens(features, name, part):
    """The test material can see a feature dropped: transformers' tokens change without it."""
    f = features(name)
    model = _without(f, part)
    for prompt in f.prompts:
        ids = torch.tensor([prompt])
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW, do_sample=False,
                                 pad_token_id=0)
        tokens = out[0, len(prompt):].tolist()
        eos = model.config.eos_token_id
        if tokens[: tokens.index(eos) + 1 if eos in tokens else None] != f.reference(None, tuple(prompt)):
            return
    pytest.fail(f"{name} without its {part} gives the same tokens: the parity tests would not see it dropped")
