"""The oracle itself: PEFT works on the installed transformers, and the golden file is sound."""

from __future__ import annotations

import json

import pytest

from tests import oracle
from tests.factory import ARCHITECTURES, VARIANTS


def test_peft_works_on_the_installed_transformers():
    """The one clear message when a release breaks PEFT (the parity tests then use the golden file)."""
    verdict = oracle.check()
    if not verdict.ok:
        if oracle.mode == "optional":
            pytest.skip(verdict.message)
        pytest.fail(verdict.message, pytrace=False)


def test_golden_file_covers_every_architecture_and_variant():
    data = json.loads(oracle.GOLDEN.read_text())
    for arch in ARCHITECTURES:
        assert arch in data["material"]
        for variant in (None, *VARIANTS):
            cases = [k for k in data["cases"] if k.startswith(f"{arch}/{variant or 'base'}/")]
            assert len(cases) >= 5, f"{arch}/{variant}: {len(cases)} golden prompts"
    for key, case in data["cases"].items():
        assert len(case["tokens"]) == len(case["logprobs"]) > 0, key
        assert len(case["tokens"]) <= case["max_new_tokens"], key
    # Every adapter changes the base model's greedy tokens on some prompt: parity means something.
    for arch in ARCHITECTURES:
        for variant in VARIANTS:
            for key, case in data["cases"].items():
                if key.startswith(f"{arch}/{variant}/"):
                    base = data["cases"][key.replace(f"/{variant}/", "/base/", 1)]
                    if base["tokens"] != case["tokens"]:
                        break
            else:
                raise AssertionError(f"{arch}/{variant} gives the base model's tokens on every golden prompt")


def test_golden_material_is_what_the_factory_builds(worlds):
    """The models and adapters are drawn from seeds alone: the same weights on every release."""
    data = json.loads(oracle.GOLDEN.read_text())
    w = worlds.get("llama")
    assert oracle.same_material(oracle.fingerprint(w.model_dir), data["material"]["llama"])
    for variant, path in w.adapter_dirs.items():
        assert oracle.same_material(oracle.fingerprint(path), data["material"][f"llama/{variant}"]), variant
