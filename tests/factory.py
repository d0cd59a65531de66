"""Test material made on the spot: tiny base models of several architectures and PEFT adapters of
every variant with non-trivial random weights, saved with `save_pretrained` as users would."""

from __future__ import annotations

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
__all__ = ["ARCHITECTURES", "VARIANTS", "make_model", "make_adapter", "peft_model", "peft_greedy"]


def make_model(root: Path, arch: str) -> Path:
    """A tiny random model of `arch` saved under root/arch (reused if already there)."""
    path = Path(root) / arch
    if not (path / "config.json").exists():
        save_tiny_model(path, arch, seed=0)
    return path


def trained_peft(model_dir: Path, variant: str, seed: int = 0):
    """A PEFT model of `variant` in training mode, its trainable weights perturbed so they matter."""
    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), VARIANTS[variant]())
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.5)
    return model


def make_adapter(model_dir: Path, out: Path, variant: str, seed: int = 0) -> Path:
    """Save a `variant` adapter for the model at `model_dir` with PEFT's save_pretrained."""
    out = Path(out)
    if not (out / "adapter_config.json").exists():
        trained_peft(model_dir, variant, seed).save_pretrained(out)
    return out


@lru_cache(maxsize=32)
def peft_model(model_dir: Path, adapter_dir: Path | None):
    base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    return base if adapter_dir is None else PeftModel.from_pretrained(base, adapter_dir).eval()


def peft_greedy(model_dir: Path, adapter_dir: Path | None, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """The reference: PeftModel.generate's greedy tokens, cut after the first EOS as the server does."""
    model = peft_model(Path(model_dir), None if adapter_dir is None else Path(adapter_dir))
    ids = torch.tensor([prompt_ids])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, pad_token_id=0)
    tokens = out[0, len(prompt_ids):].tolist()
    eos = model.config.eos_token_id
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens
