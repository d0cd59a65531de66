"""The test oracle: PEFT's greedy tokens, live and as golden references, and the check that PEFT
works at all on the installed transformers before any test trusts it.

PEFT is only the oracle: when a transformers release breaks PEFT (5.24 made PEFT 0.21.2 ignore
prefix tuning), the server is not wrong, and the tests must say so in one message instead of
dozens of token mismatches. So:

- `check()` runs once per session: a prefix-tuned PEFT model's greedy output must differ from the
  base model's, and PEFT's KV-cached generate must equal its own uncached step-by-step forward.
- `expected()` is what every parity test compares the server with. When the check passes it is
  live PEFT, and live PEFT must also equal the golden file (`golden/peft_greedy.json`, made by
  `python -m tests.make_golden` under the locked versions). When the check fails it is the
  golden file alone, so a release that breaks the server, not the oracle, still shows by name.
- When the check fails, `tests/unit/test_oracle.py` fails with its one message, and so does every
  test that needs live PEFT for a case the golden file lacks (logits, say). With
  `pytest --peft-oracle=optional` (`.ci/run-latest`, newest releases) those are skipped instead.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Callable

import pytest

GOLDEN = Path(__file__).parent / "golden" / "peft_greedy.json"
MODES = ("required", "optional")  # pytest --peft-oracle
mode = "required"  # set from the command line by tests/conftest.py


@dataclass(frozen=True)
class Verdict:
    ok: bool
    message: str  # why PEFT cannot be trusted, naming both versions ("" when ok)


def versions() -> dict[str, str]:
    from importlib.metadata import version

    return {name: version(name) for name in ("peft", "transformers", "torch")}


@cache
def check() -> Verdict:
    """Does PEFT give right tokens on the installed transformers? Run once, on its own tiny llama."""
    import torch

    from tests.factory import load_peft, make_model, peft_greedy

    v = versions()
    prefix = f"PEFT {v['peft']} does not work with transformers {v['transformers']}"
    try:
        root = Path(tempfile.mkdtemp(prefix="peft-oracle-"))
        model_dir = make_model(root, "llama")
        prompts = ([5, 70, 80, 90], [60, 61, 62, 63, 64, 65, 66, 67, 68])
        prefix_dir = _adapter(model_dir, root, "prefix")
        for ids in prompts:
            if peft_greedy(model_dir, prefix_dir, ids, 8) == peft_greedy(model_dir, None, ids, 8):
                return Verdict(False, f"{prefix}: a prefix-tuned model generates the base model's tokens "
                                      f"(PEFT's prefix is ignored) on prompt {ids}")
        for variant in ("prefix", "prompt"):
            model = load_peft(model_dir, _adapter(model_dir, root, variant))
            for ids in prompts:
                cached = peft_greedy(model_dir, _adapter(model_dir, root, variant), ids, 8)
                uncached = list(ids)
                with torch.no_grad():
                    for _ in range(len(cached)):
                        full = torch.tensor([uncached])
                        logits = model(input_ids=full, attention_mask=torch.ones_like(full)).logits[0, -1]
                        uncached.append(int(logits.argmax()))
                if cached != uncached[len(ids):]:
                    return Verdict(False, f"{prefix}: {variant} tuning's KV-cached generate gives {cached} but its "
                                          f"own uncached forward gives {uncached[len(ids):]} on prompt {ids}")
    except Exception as exc:  # PEFT failing to load or run at all is the same verdict
        return Verdict(False, f"{prefix}: {type(exc).__name__}: {exc}")
    return Verdict(True, "")


def _adapter(model_dir: Path, root: Path, variant: str) -> Path:
    from tests.factory import make_adapter

    return make_adapter(model_dir, root / f"oracle-{variant}", variant)


def require_live() -> None:
    """For tests that need live PEFT itself (logits, not tokens): fail, or skip when optional."""
    verdict = check()
    if not verdict.ok:
        if mode == "required":
            pytest.fail(verdict.message, pytrace=False)
        pytest.skip(f"live PEFT unusable: {verdict.message}")


# --- golden references -------------------------------------------------------------------------


def case_key(arch: str, variant: str | None, prompt_ids: list[int]) -> str:
    return f"{arch}/{variant or 'base'}/{','.join(map(str, prompt_ids))}"


@cache
def golden() -> dict:
    return json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {"cases": {}, "material": {}}


def fingerprint(directory: Path) -> dict[str, list]:
    """What the tensors of a directory's safetensors files are: per tensor its shape and three
    moments. Summaries, not a hash: saved encoder outputs differ in the last bits with the
    number of threads that computed them, and such a difference is not another material."""
    import torch
    from safetensors import safe_open

    summary = {}
    for path in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            for name in sorted(f.keys()):
                t = f.get_tensor(name).double().flatten()
                ramp = torch.linspace(-1, 1, t.numel(), dtype=torch.float64)
                summary[f"{path.name}:{name}"] = [list(f.get_slice(name).get_shape()), round(float(t.sum()), 4),
                                                  round(float(t.abs().sum()), 4), round(float((t * ramp).sum()), 4)]
    return summary


def same_material(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        a[k][0] == b[k][0] and all(abs(x - y) <= 1e-3 * (1 + abs(x)) for x, y in zip(a[k][1:], b[k][1:])) for k in a)


@cache
def _material_matches(label: str, directory: Path) -> None:
    """The golden file was made from these exact weights; say so loudly if they changed."""
    recorded = golden()["material"].get(label)
    if recorded is not None and not same_material(recorded, fingerprint(directory)):
        pytest.fail(f"the test material {label} ({directory}) is not what {GOLDEN.name} was made from: its "
                    "weights changed (tests/factory.py or server/demo/tiny.py?). Rebuild the file with "
                    "`python -m tests.make_golden` under the locked versions", pytrace=False)


def expected(arch: str, variant: str | None, prompt_ids: list[int], max_new_tokens: int, model_dir: Path,
             adapter_dir: Path | None, live: Callable[[], list[int]]) -> list[int]:
    """PEFT's greedy tokens for a parity case: live when PEFT can be trusted (and then equal to the
    golden file's, when it has the case), else the golden file's, else the check's failure."""
    case = golden()["cases"].get(case_key(arch, variant, prompt_ids))
    reference = None
    if case is not None and (max_new_tokens <= case["max_new_tokens"] or len(case["tokens"]) < case["max_new_tokens"]):
        _material_matches(f"{arch}", Path(model_dir))
        if adapter_dir is not None:
            _material_matches(f"{arch}/{variant}", Path(adapter_dir))
        reference = case["tokens"][:max_new_tokens]
    verdict = check()
    if verdict.ok:
        tokens = live()
        if reference is not None and tokens != reference:
            v = versions()
            pytest.fail(f"live PEFT {v['peft']} (transformers {v['transformers']}) gives {tokens} but {GOLDEN.name} "
                        f"has {reference} for {case_key(arch, variant, prompt_ids)}: the golden file is stale; "
                        "rebuild it with `python -m tests.make_golden`", pytrace=False)
        return tokens
    if reference is None:
        require_live()
    return reference


def expected_logprobs(arch: str, variant: str | None, prompt_ids: list[int], tokens: list[int],
                      live: Callable[[], list[float]]) -> list[float]:
    """Teacher-forced log-probabilities of `tokens` (a prefix of the greedy tokens): live or golden."""
    if check().ok:
        return live()
    case = golden()["cases"].get(case_key(arch, variant, prompt_ids))
    if case is not None and case["tokens"][: len(tokens)] == list(tokens):
        return case["logprobs"][: len(tokens)]
    require_live()
