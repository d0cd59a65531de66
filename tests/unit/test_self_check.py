"""The start-up self-check: passes on every architecture, refuses a deliberately broken attention."""

from __future__ import annotations

import time

import pytest

from server.engine import attention
from server.engine.kv_cache import KVPool
from server.engine.self_check import SelfCheckFailed, check_packed_forward
from tests.factory import ARCHITECTURES


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_self_check_passes_and_leaves_the_runner_idle(worlds, arch):
    runner = worlds.get(arch).engine().runner
    started = time.perf_counter()
    assert check_packed_forward(runner) < 1e-4
    assert time.perf_counter() - started < 1.0
    assert runner.seqs == [] and runner.pool.held == 0


@pytest.fixture
def broken_attention(monkeypatch):
    """The packed steps' attention, its output scaled: what a changed internal could do. Both forwards
    the runner may use (transformers' with our attention registered, and `lean_forward`) attend
    through `attention.attend`."""
    original = attention.attend

    def broken(*args, **kwargs):
        return original(*args, **kwargs) * 0.5

    monkeypatch.setattr(attention, "attend", broken)


def test_self_check_refuses_a_broken_attention(llama, broken_attention):
    with pytest.raises(SelfCheckFailed) as failed:
        check_packed_forward(llama.engine().runner)
    message = str(failed.value)
    assert "LlamaForCausalLM" in message and "transformers 5." in message and "prefill" in message


def test_self_check_refuses_an_ignored_prefix(llama, monkeypatch):
    """PEFT's own failure under transformers 5.24, in the server: the prefix silently dropped."""
    monkeypatch.setattr(KVPool, "write_prefix", lambda self, seg, prefix: setattr(seg, "length", prefix.shape[3]))
    with pytest.raises(SelfCheckFailed, match="LlamaForCausalLM"):
        check_packed_forward(llama.engine().runner)


def test_server_refuses_to_start_with_a_broken_attention(llama, broken_attention, tmp_path):
    from server.__main__ import build_service
    from server.config import load_config

    config = load_config(["--model", str(llama.model_dir), "--adapter-dir", str(tmp_path / "store")])
    with pytest.raises(SystemExit, match="refusing to start: LlamaForCausalLM under transformers"):
        build_service(config)
