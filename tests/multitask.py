"""Multitask prompt tuning test material: a PEFT MULTITASK_PROMPT_TUNING adapter whose tasks give
different tokens, and PEFT's own greedy tokens per task (`PeftModel.generate(task_ids=...)`)."""

from __future__ import annotations

import zlib
from functools import lru_cache
from pathlib import Path

import torch

NUM_TASKS = 3
NUM_VIRTUAL_TOKENS = 5
NUM_RANKS = 2


def make_multitask(model_dir: Path, out: Path, seed: int = 0) -> Path:
    """save_pretrained of a multitask adapter for the model at `model_dir`: the shared prompt and
    every task's factors drawn from `seed` (each task its own draw, so the tasks differ)."""
    from peft import MultitaskPromptTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out = Path(out)
    if (out / "adapter_config.json").exists():
        return out
    config = MultitaskPromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=NUM_VIRTUAL_TOKENS,
                                         num_tasks=NUM_TASKS, num_ranks=NUM_RANKS)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), config)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if param.requires_grad:  # embedding [n, d]; prefix_task_cols [tasks, n, r]; prefix_task_rows [tasks, r, d]
                generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
                param.copy_(torch.randn(param.shape, generator=generator) * (1.5 if "embedding" in name else 1.0))
    model.save_pretrained(out)
    return out


@lru_cache(maxsize=8)
def _peft(model_dir: Path, adapter_dir: Path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return PeftModel.from_pretrained(base, adapter_dir).eval()


def peft_task_prompt(model_dir: Path, adapter_dir: Path, task: int) -> torch.Tensor:
    """PEFT's virtual-token embeddings of `task`: [num_virtual_tokens, hidden]."""
    model = _peft(Path(model_dir), Path(adapter_dir))
    encoder = model.prompt_encoder["default"]
    with torch.no_grad():
        return encoder(torch.arange(NUM_VIRTUAL_TOKENS)[None], torch.tensor([task]))[0]


def peft_task_greedy(model_dir: Path, adapter_dir: Path, task: int, prompt_ids: list[int],
                     max_new_tokens: int) -> list[int]:
    """PeftModel.generate(task_ids=[task])'s greedy tokens, cut after the first EOS as the server does."""
    from tests import oracle

    oracle.require_live()
    model = _peft(Path(model_dir), Path(adapter_dir))
    ids = torch.tensor([prompt_ids])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), task_ids=torch.tensor([task]),
                         max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)
    tokens = out[0, len(prompt_ids):].tolist()
    eos = model.config.eos_token_id
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens
