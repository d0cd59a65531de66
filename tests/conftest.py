"""Shared, session-scoped test material: tiny base models of every architecture, loaded once
through the server's own `load_base_model`, and PEFT adapters of every variant, built once.

Everything is built lazily (`worlds.get(arch)`), so running a subset of the tests builds only
what that subset needs. PEFT's greedy tokens (the reference) are cached per request.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import traceback
from pathlib import Path

import pytest

pytest_plugins = ["tests.s3"]  # the S3-compatible server fixtures (s3_endpoint, bucket)

# Heavy imports (torch, transformers, peft) happen inside the fixtures, so that test directories
# that do not use this material (tests/integration, test_docker.py) do not pay for them.

MAX_NEW = 10  # tokens generated per request in the parity tests
PROMPTS = ("Hi", "the quick brown fox jumps")  # two prompt lengths (2 and 25 byte tokens)
PEFT_TYPES = {
    "prompt": "PROMPT_TUNING",
    "ptuning-mlp": "P_TUNING",
    "ptuning-lstm": "P_TUNING",
    "prefix": "PREFIX_TUNING",
    "prefix-proj": "PREFIX_TUNING",
}


class ArchWorld:
    """One architecture: its tiny model on disk and loaded, and one adapter of every variant."""

    def __init__(self, root: Path, arch: str):
        from adapters import AdapterRegistry
        from server.model import load_base_model
        from tests.factory import VARIANTS, make_model

        self.arch = arch
        self.root = root
        self.model_dir = make_model(root, arch)
        self.base = load_base_model(str(self.model_dir), dtype="float32")  # PEFT compares in float32
        self.spec = self.base.spec
        self.model = self.base.model
        self.tokenizer = self.base.tokenizer
        self.adapter_dirs: dict[str, Path] = {}  # variant -> save_pretrained output
        self.checkpoint_dirs: dict[str, Path] = {}  # variant -> encoder weights as training saves them
        self.registry = AdapterRegistry(self.spec, self.model)  # no store: registered by variant name
        self._references: dict[tuple, list[int]] = {}
        for variant in VARIANTS:
            self._build_adapter(variant)

    def _build_adapter(self, variant: str) -> None:
        from safetensors.torch import save_file

        from tests.factory import trained_peft

        peft = trained_peft(self.model_dir, variant, seed=0)
        out = self.root / f"{self.arch}-{variant}"
        peft.save_pretrained(out)
        # A training checkpoint: the prompt encoder's own parameters, not passed through it.
        prefix = "prompt_encoder.default."
        state = {k: v.detach().clone().contiguous() for k, v in peft.state_dict().items() if k.startswith(prefix)}
        assert state, f"no {prefix}* parameters in the PEFT model"
        ckpt = self.root / f"{self.arch}-{variant}-ckpt"
        ckpt.mkdir()
        save_file(state, str(ckpt / "adapter_model.safetensors"))
        shutil.copy(out / "adapter_config.json", ckpt / "adapter_config.json")
        self.adapter_dirs[variant] = out
        self.checkpoint_dirs[variant] = ckpt
        self.registry.add_dir(variant, out, source="test")

    # --- helpers used by the tests ---------------------------------------------------------------

    def ids(self, text: str) -> list[int]:
        return self.tokenizer(text).input_ids

    def adapter(self, variant: str | None):
        return None if variant is None else self.registry.get(variant)

    def engine(self, **kwargs):
        from server.engine.engine import Engine

        return Engine(self.model, self.tokenizer, self.spec, **kwargs)

    def reference(self, variant: str | None, prompt_ids: list[int], max_new_tokens: int = MAX_NEW) -> list[int]:
        """PeftModel.generate's greedy tokens (the base model's for variant None): `tests.oracle.expected`."""
        from tests import oracle
        from tests.factory import peft_greedy

        adapter_dir = None if variant is None else self.adapter_dirs[variant]
        key = (variant, tuple(prompt_ids), max_new_tokens)
        if key not in self._references:
            self._references[key] = oracle.expected(
                self.arch, variant, list(prompt_ids), max_new_tokens, self.model_dir, adapter_dir,
                live=lambda: peft_greedy(self.model_dir, adapter_dir, list(prompt_ids), max_new_tokens))
        return self._references[key]

    def reference_logprobs(self, variant: str | None, prompt_ids: list[int], tokens: list[int]) -> list[float]:
        """PEFT's log-probability of each of `tokens` after the prompt, teacher-forced in one forward."""
        from tests import oracle
        from tests.factory import teacher_forced_logprobs

        adapter_dir = None if variant is None else self.adapter_dirs[variant]
        return oracle.expected_logprobs(self.arch, variant, list(prompt_ids), list(tokens), live=lambda: (
            teacher_forced_logprobs(self.model_dir, adapter_dir, list(prompt_ids), list(tokens))))

    def config(self, variant: str) -> dict:
        return json.loads((self.adapter_dirs[variant] / "adapter_config.json").read_text())

    def files(self, variant: str) -> tuple[bytes, bytes]:
        d = self.adapter_dirs[variant]
        return (d / "adapter_config.json").read_bytes(), (d / "adapter_model.safetensors").read_bytes()


class Worlds:
    def __init__(self, root: Path):
        self.root = root
        self._worlds: dict[str, ArchWorld] = {}
        self._others: dict[str, Path] = {}

    def get(self, arch: str) -> ArchWorld:
        if arch not in self._worlds:
            self._worlds[arch] = ArchWorld(self.root, arch)
        return self._worlds[arch]

    def other_model(self, name: str, **config_kwargs) -> Path:
        """A tiny llama whose sizes differ from the standard one (for adapters that must not fit)."""
        if name not in self._others:
            from server.demo.tiny import save_tiny_model

            self._others[name] = save_tiny_model(self.root / "other" / name, "llama", seed=0, **config_kwargs)
        return self._others[name]


def pytest_addoption(parser):
    from tests import oracle

    parser.addoption("--peft-oracle", choices=oracle.MODES, default="required",
                     help="required: a PEFT that fails its check fails every parity test (the locked install); "
                          "optional: parity tests then use the golden references alone (.ci/run-latest)")


def pytest_configure(config):
    from tests import oracle

    oracle.mode = config.getoption("--peft-oracle")
    # transformers' deprecations are errors when the project's own code is what calls the old API:
    # warnings attributed to server/ or adapters/, and transformers' logged deprecation notices
    # ("`past_key_values` ... deprecated", 5.24) emitted while a server/ or adapters/ frame is on the stack.
    for category in ("DeprecationWarning", "FutureWarning"):
        config.addinivalue_line("filterwarnings", rf"error::{category}:(server|adapters)(\.|$)")
    logging.getLogger("transformers").addHandler(_DeprecatedFromOurCode())


class _DeprecatedFromOurCode(logging.Handler):
    OURS = tuple(str(Path(__file__).resolve().parents[1] / d) + os.sep for d in ("server", "adapters"))

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "deprecat" not in message.lower():
            return
        ours = [f for f in traceback.extract_stack() if f.filename.startswith(self.OURS)]
        if ours:
            raise DeprecationWarning(f"{ours[-1].filename}:{ours[-1].lineno} uses a deprecated transformers "
                                     f"API: {message}")


@pytest.fixture(scope="session")
def worlds(tmp_path_factory) -> Worlds:
    import torch

    torch.set_num_threads(1)  # tiny models gain nothing from more; 2 threads thrash on a busy 2-core machine
    return Worlds(tmp_path_factory.mktemp("worlds"))


# Every engine path the parity tests run under (`server.engine.fast_path.FastPaths`), each skipped, with its
# reason, where this machine cannot run it: `auto` is what this machine picks; the others force a path.
PATHS = {
    "auto": {},
    "avx2": {"linear": "avx2"},  # our AVX2 kernel (on AVX-512 CPUs too), with the native decode where it applies
    # oneDNN with the layers in Python: `auto` takes oneDNN with the native decode on AVX-512 CPUs, and
    # test_lean_forward checks the native decode on oneDNN against these layers on every machine
    "onednn": {"linear": "onednn", "native_decode": "off"},
    "torch-sdpa": {"linear": "torch", "attention": "sdpa"},
    "plain": {"enabled": False},  # --fast-path off: transformers' forward, plain linears, SDPA
}


@pytest.fixture(params=list(PATHS))
def paths(request):
    """The FastPaths of one entry of PATHS, or a skip saying why this machine cannot run it."""
    from server.engine.cpu import linear as cpu_linear
    from server.engine.fast_path import FastPaths

    choice = PATHS[request.param].get("linear")
    problem = cpu_linear.unavailable(choice) if choice in ("avx2", "onednn") else ""
    if problem:
        pytest.skip(f"--cpu-linear {choice} cannot run here: {problem}")
    return FastPaths(**PATHS[request.param])


@pytest.fixture(scope="session")
def llama(worlds) -> ArchWorld:
    return worlds.get("llama")


@pytest.fixture
def store_registry(llama, tmp_path):
    """A fresh registry over the llama model, backed by an empty store in tmp_path."""
    from adapters import AdapterRegistry, AdapterStore

    store = AdapterStore(tmp_path / "store")
    return AdapterRegistry(llama.spec, llama.model, store), store


__all__ = ["MAX_NEW", "PATHS", "PEFT_TYPES", "PROMPTS", "ArchWorld", "Worlds"]


def each_isa(hold, request):
    """The body of an `isa` fixture: the test runs with `hold(request.param)` (cpu_attention.isa,
    rowwise.isa), skipped where this CPU lacks that instruction set."""
    with hold(request.param) as taken:
        if taken != request.param:
            pytest.skip(f"this CPU has no {request.param} (the kernel takes {taken})")
        yield taken


@pytest.fixture(scope="session")
def cpu_kernels_built() -> None:
    """The engine's C++ CPU kernels built; skipped only where this machine cannot build extensions at all."""
    import shutil

    from torch.utils import cpp_extension

    from server.engine.cpu import kernels as cpu_kernels

    if not cpp_extension.is_ninja_available() or not shutil.which(cpp_extension.get_cxx_compiler()):
        pytest.skip("no C++ compiler or ninja: the CPU kernels cannot be built here")
    assert cpu_kernels.available(), "the CPU kernels failed to build: see the warning logged above"
