"""The built-in demo: the shipped model and adapters load through the real path and visibly steer."""

import pytest

from adapters import AdapterRegistry
from server.engine.engine import Engine
from server.engine.request import SamplingParams
from server.model import DEMO_ADAPTERS, load_base_model

PROMPT = "Question: Tell me about the sea.\nAnswer:"
STYLES = {  # adapter -> (its kind, what its answer must show)
    "pirate": ("PROMPT_TUNING", lambda text: text.startswith(" Arr, matey!")),
    "shouty": ("P_TUNING", lambda text: text.strip() and text == text.upper()),
    "robot": ("PREFIX_TUNING", lambda text: text.startswith(" BEEP BOOP.")),
}


@pytest.fixture(scope="module")
def demo():
    base = load_base_model(None, dtype="float32")
    registry = AdapterRegistry(base.spec, base.model)
    for name in STYLES:
        registry.add_dir(name, DEMO_ADAPTERS / name, source="demo")
    return base, registry, Engine(base.model, base.tokenizer, base.spec)


def answer(demo, adapter_name):
    base, registry, engine = demo
    adapter = registry.get(adapter_name) if adapter_name else None
    return engine.generate(base.tokenizer(PROMPT).input_ids, SamplingParams(max_new_tokens=100), adapter).text


def test_base_answers_plainly(demo):
    text = answer(demo, None)
    assert "sea" in text and text != text.upper() and "Arr" not in text and "BEEP" not in text


@pytest.mark.parametrize("name", sorted(STYLES))
def test_each_demo_adapter_steers_in_its_style(demo, name):
    kind, shows_style = STYLES[name]
    assert demo[1].get(name).peft_type == kind
    text = answer(demo, name)
    assert shows_style(text), f"{name}: {text!r}"
