"""Fixtures for the integration tests: the tiny llama model and PEFT adapters on disk, one shared
server process for the session, a factory for extra servers, and PEFT's greedy reference."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest

from tests import oracle
from tests.factory import VARIANTS, make_adapter, make_model, peft_greedy

from .support import ServerProcess, upload

PROMPT = "Hello world"
EOS_PROMPT = "Hi stop"  # the prefix-proj adapter ends it with EOS within a few tokens (PEFT agrees)


@pytest.fixture(scope="session")
def material(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("integration-material")


@pytest.fixture(scope="session")
def model_dir(material) -> Path:
    return make_model(material, "llama")


@pytest.fixture(scope="session")
def adapter_srcs(model_dir, material) -> dict[str, Path]:
    """variant -> a directory written by PEFT's save_pretrained for the tiny llama."""
    return {v: make_adapter(model_dir, material / "adapters" / v, v) for v in VARIANTS}


@pytest.fixture(scope="session")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="session")
def reference(model_dir, adapter_srcs, tokenizer):
    """reference(variant | None, prompt, n): PeftModel.generate's greedy token ids (`tests.oracle.expected`)."""
    cache: dict[tuple, list[int]] = {}

    def ref(variant: str | None, prompt: str, max_new_tokens: int) -> list[int]:
        key = (variant, prompt, max_new_tokens)
        if key not in cache:
            ids = tokenizer(prompt).input_ids
            adapter_dir = None if variant is None else adapter_srcs[variant]
            cache[key] = oracle.expected("llama", variant, ids, max_new_tokens, model_dir, adapter_dir,
                                         live=lambda: peft_greedy(model_dir, adapter_dir, ids, max_new_tokens))
        return cache[key]

    return ref


@contextlib.contextmanager
def running_server(model_dir: Path, adapter_dir: Path, log_dir: Path, *extra, name: str = "server",
                   env: dict[str, str] | None = None):
    server = ServerProcess(model_dir, adapter_dir, log_dir, *extra, name=name, env=env)
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def server(model_dir, tmp_path_factory):
    """The one shared server, with an empty store of its own."""
    root = tmp_path_factory.mktemp("main-server")
    with running_server(model_dir, root / "store", root, name="main") as s:
        yield s


@pytest.fixture(scope="session")
def store_dir(server) -> Path:
    return server.adapter_dir


@pytest.fixture
def client(server):
    with server.client() as c:
        yield c


@pytest.fixture(scope="session")
def uploaded(server, adapter_srcs) -> dict[str, str]:
    """variant -> name of that adapter, uploaded once to the shared server (left in place)."""
    names = {}
    with server.client() as c:
        for variant, src in adapter_srcs.items():
            name = f"ad-{variant}"
            r = upload(c, name, src)
            assert r.status_code == 201, r.text
            names[variant] = name
    return names


@pytest.fixture
def start_server(model_dir, tmp_path):
    """start_server(*flags, adapter_dir=None, env=None): an extra server, stopped at the end of the test."""
    started: list[ServerProcess] = []

    def start(*extra, adapter_dir: Path | None = None, name: str = "extra",
              env: dict[str, str] | None = None) -> ServerProcess:
        s = ServerProcess(model_dir, adapter_dir or tmp_path / f"store-{len(started)}", tmp_path, *extra, name=name,
                          env=env)
        started.append(s)
        return s.start()

    yield start
    for s in started:
        s.stop()
