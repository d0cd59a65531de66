"""Test material made on the spot: tiny base models of several architectures and PEFT adapters of
every variant with non-trivial random weights, saved with `save_pretrained` as users would."""

from __future__ import annotations

import zlib
from functools import lru_cache
from pathlib import Path

import torch
from peft import PeftModel, PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, get_peft_model
from transformers import AutoModelForCausalLM

from server.demo.tiny import ARCHITECTURES, save_tiny_model

VARIANTS = {
    "prompt": lambda: PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5),
    "ptuning-mlp": lambda: PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=7, encoder_hidden_size=32),
    "ptuning-lstm": lambda: PromptEncoderConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=4, encoder_reparameterization_type="LSTM", encoder_hidden_size=32
    ),
    "prefix": lambda: PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=6),
    "prefix-proj": lambda: PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=3, prefix_projection=True, encoder_hidden_size=32
    ),
}
# Model features the parity tests check one by one (tests/unit/test_model_features.py): name -> (architecture,
# config overrides, the adapter variant checked with it). "qwen2" is the standard tiny Qwen2 (ARCHITECTURES').
ROPE_ORIGINAL = 16  # original_max_position_embeddings of the scaled RoPE types: short, so the parity prompts pass it
FEATURES = {
    "qwen2": ("qwen2", {}, "prefix"),  # q/k/v biases, lm_head tied to the embeddings
    "qwen2-untied": ("qwen2", dict(tie_word_embeddings=False), "ptuning-mlp"),
    "llama-bias": ("llama", dict(attention_bias=True, mlp_bias=True), "prompt"),
    "llama-tied": ("llama", dict(tie_word_embeddings=True), "prefix-proj"),
    "llama-rope-linear": ("llama", dict(rope_parameters=dict(rope_type="linear", factor=2.0)), "prompt"),
    # past its 16 positions: rotated per length; with prefix tuning, as a prompt-tuning prefix is not (rope.py)
    "llama-rope-dynamic": ("llama", dict(max_position_embeddings=ROPE_ORIGINAL,
                                         rope_parameters=dict(rope_type="dynamic", factor=4.0)), "prefix"),
    "llama-rope-llama3": ("llama", dict(rope_parameters=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=ROPE_ORIGINAL)), "ptuning-lstm"),
    "llama-rope-yarn": ("llama", dict(max_position_embeddings=4 * ROPE_ORIGINAL, rope_parameters=dict(
        rope_type="yarn", factor=4.0, original_max_position_embeddings=ROPE_ORIGINAL)), "prompt"),
}
__all__ = ["ARCHITECTURES", "FEATURES", "VARIANTS", "make_model", "make_adapter", "load_peft", "peft_model", "peft_greedy",
           "teacher_forced_logprobs"]


def make_model(root: Path, name: str) -> Path:
    """A tiny random model of architecture `name`, or of feature `name` (FEATURES), saved under root/name
    (reused if already there)."""
    path = Path(root) / name
    if not (path / "config.json").exists():
        arch, overrides = (name, {}) if name in ARCHITECTURES else FEATURES[name][:2]
        save_tiny_model(path, arch, seed=0, **overrides)
    return path


ADAPTER_STD = {"prefix": 1.5}  # trainable weights' std by variant, else 0.5: raw prefix keys/values as large as the model's


def trained_peft(model_dir: Path, variant: str, seed: int = 0):
    """A PEFT model of `variant` in training mode, its trainable weights drawn from `seed` alone
    (not PEFT's own initialisation, which may change between releases), large enough to matter:
    each changes the parity prompts' greedy tokens (tests/unit/test_model_features.py, tests.oracle.check)."""
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), VARIANTS[variant]())
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if param.requires_grad:
                generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
                param.copy_(torch.randn(param.shape, generator=generator) * ADAPTER_STD.get(variant, 0.5))
    return model


def make_adapter(model_dir: Path, out: Path, variant: str, seed: int = 0) -> Path:
    """Save a `variant` adapter for the model at `model_dir` with PEFT's save_pretrained."""
    out = Path(out)
    if not (out / "adapter_config.json").exists():
        trained_peft(model_dir, variant, seed).save_pretrained(out)
    return out


@lru_cache(maxsize=32)
def load_peft(model_dir: Path, adapter_dir: Path | None):
    """PEFT's model (the base model for adapter_dir None), unchecked: see `peft_model`."""
    base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    return base if adapter_dir is None else PeftModel.from_pretrained(base, adapter_dir).eval()


def peft_model(model_dir: Path, adapter_dir: Path | None):
    """PEFT's model for tests that compare with live PEFT, once the oracle check has passed."""
    from tests import oracle

    oracle.require_live()
    return load_peft(Path(model_dir), None if adapter_dir is None else Path(adapter_dir))


def peft_greedy(model_dir: Path, adapter_dir: Path | None, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """PeftModel.generate's greedy tokens, cut after the first EOS as the server does. Unchecked:
    tests reach it through `tests.oracle.expected`, which checks PEFT first."""
    model = load_peft(Path(model_dir), None if adapter_dir is None else Path(adapter_dir))
    ids = torch.tensor([prompt_ids])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, pad_token_id=0)
    tokens = out[0, len(prompt_ids):].tolist()
    eos = model.config.eos_token_id
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens


def teacher_forced_logprobs(model_dir: Path, adapter_dir: Path | None, prompt_ids: list[int],
                            tokens: list[int]) -> list[float]:
    """PEFT's log-probability of each of `tokens` after the prompt, in one forward. Unchecked."""
    model = load_peft(Path(model_dir), None if adapter_dir is None else Path(adapter_dir))
    full = torch.tensor([list(prompt_ids) + list(tokens[:-1])])
    with torch.no_grad():
        logits = model(input_ids=full, attention_mask=torch.ones_like(full)).logits[0, -len(tokens):]
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    return [float(logprobs[i, t]) for i, t in enumerate(tokens)]
