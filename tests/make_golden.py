"""Rebuild tests/golden/peft_greedy.json: PEFT's greedy tokens (and their log-probabilities) for
every parity case, under the locked versions.

    .venv/bin/python -m tests.make_golden          # writes the file; run it again: the same bytes

The cases: every architecture x (no adapter + every variant) x every parity prompt, 16 new tokens,
and the two long generations the integration tests compare with; and every model feature
(`tests.factory.FEATURES`) x (no adapter + its variant) x the two parity prompts. The test models and adapters
are drawn from fixed seeds (`server.demo.tiny.seeded_init`, `tests.factory.trained_peft`), and
their weights' fingerprints go into the file, so a test can tell "the material changed" from
"the server changed". It refuses to write when PEFT fails its check (`tests.oracle.check`).
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch

from tests import oracle
from tests.conftest import PROMPTS
from tests.factory import (ARCHITECTURES, FEATURES, VARIANTS, make_model, peft_greedy, teacher_forced_logprobs,
                           trained_peft)

NEW_TOKENS = 16
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]  # test_openai's
INTEGRATION_PROMPT, EOS_PROMPT = "Hello world", "Hi stop"  # tests/integration/conftest.py's
OTHER_PROMPTS = ("a", "the quick brown fox")  # test_adapters_http.py's second prompts
LONG = {("llama", None): 300, ("llama", "ptuning-lstm"): 150}  # test_shutdown, test_delete_while_...


def build(root: Path) -> dict:
    from transformers import AutoTokenizer

    cases, material = {}, {}
    for arch in ARCHITECTURES:
        model_dir = make_model(root, arch)
        material[arch] = oracle.fingerprint(model_dir)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        chat = tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
        prompts = [*PROMPTS, INTEGRATION_PROMPT, EOS_PROMPT, *OTHER_PROMPTS, chat]
        for variant in (None, *VARIANTS):
            adapter_dir = None
            if variant is not None:
                adapter_dir = root / f"{arch}-{variant}"
                trained_peft(model_dir, variant, seed=0).save_pretrained(adapter_dir)
                material[f"{arch}/{variant}"] = oracle.fingerprint(adapter_dir)
            for prompt in prompts:
                ids = tokenizer(prompt).input_ids
                n = LONG.get((arch, variant), NEW_TOKENS) if prompt == INTEGRATION_PROMPT else NEW_TOKENS
                tokens = peft_greedy(model_dir, adapter_dir, ids, n)
                logprobs = teacher_forced_logprobs(model_dir, adapter_dir, ids, tokens)
                cases[oracle.case_key(arch, variant, ids)] = {
                    "prompt": prompt, "max_new_tokens": n, "tokens": tokens,
                    "logprobs": [round(lp, 6) for lp in logprobs]}
            print(f"{arch}/{variant or 'base'}: {len(prompts)} prompts", file=sys.stderr)
    for name, (_, _, variant) in FEATURES.items():
        if name in ARCHITECTURES:  # the standard model, done above
            continue
        model_dir = make_model(root, name)
        material[name] = oracle.fingerprint(model_dir)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        adapter_dir = root / f"{name}-{variant}"
        trained_peft(model_dir, variant, seed=0).save_pretrained(adapter_dir)
        material[f"{name}/{variant}"] = oracle.fingerprint(adapter_dir)
        for v, directory in ((None, None), (variant, adapter_dir)):
            for prompt in PROMPTS:
                ids = tokenizer(prompt).input_ids
                tokens = peft_greedy(model_dir, directory, ids, NEW_TOKENS)
                logprobs = teacher_forced_logprobs(model_dir, directory, ids, tokens)
                cases[oracle.case_key(name, v, ids)] = {
                    "prompt": prompt, "max_new_tokens": NEW_TOKENS, "tokens": tokens,
                    "logprobs": [round(lp, 6) for lp in logprobs]}
        print(f"{name}: base and {variant}", file=sys.stderr)
    return {"about": "PEFT's greedy tokens for the parity cases; rebuild with `python -m tests.make_golden`",
            "versions": oracle.versions(), "material": material, "cases": cases}


def to_json(value, indent: int = 0) -> str:
    """JSON with objects one key a line (sorted) and every list on one line: small, diffable."""
    if not isinstance(value, dict):
        return json.dumps(value)
    pad = " " * (indent + 1)
    items = [f"{pad}{json.dumps(k)}: {to_json(value[k], indent + 1)}" for k in sorted(value)]
    return "{\n" + ",\n".join(items) + "\n" + " " * indent + "}"


def main() -> None:
    torch.set_num_threads(1)  # the same reductions on every machine
    verdict = oracle.check()
    if not verdict.ok:
        sys.exit(f"refusing to write golden references: {verdict.message}")
    with tempfile.TemporaryDirectory() as tmp:
        data = build(Path(tmp))
    oracle.GOLDEN.parent.mkdir(exist_ok=True)
    text = to_json(data)
    oracle.GOLDEN.write_text(text + "\n")
    print(f"wrote {oracle.GOLDEN} ({len(data['cases'])} cases)", file=sys.stderr)


if __name__ == "__main__":
    main()
