"""The workload every system serves: a random Llama, PEFT adapters of all five variants, random prompts.

`build_world` saves the model and the adapters under a directory (as a trainer would), loads the
model as the server does, registers the adapters with the `AdapterRegistry` (timed) and draws the
requests; the `World` it returns is what every system and every report line reads.
"""

from __future__ import annotations

import argparse
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from adapters import AdapterRegistry
from server.demo.tiny import save_tiny_model
from server.model import load_base_model

VARIANTS = ("prompt", "ptuning-mlp", "ptuning-lstm", "prefix", "prefix-proj")
PROMPT_KINDS = ("prompt",)  # variants whose TTFT is compared (PEFT re-runs their virtual tokens per request)
FIRST_ID = 3  # prompt token ids avoid <pad>, <s>, </s>


@dataclass
class Request:
    index: int
    prompt: list[int]
    adapter: int  # index into World.adapter_dirs


@dataclass
class World:
    args: argparse.Namespace
    model_dir: Path
    base: object  # server.model.BaseModel
    adapter_dirs: list[Path]
    variants: list[str]  # per adapter
    virtual: list[int]  # per adapter: num_virtual_tokens
    adapters: list  # per adapter: the registry's materialized Adapter
    requests: list[Request]
    load_s: float = 0.0  # time to register all adapters with the AdapterRegistry

    @property
    def model(self):
        return self.base.model

    @property
    def device(self) -> torch.device:
        return self.base.spec.device


def peft_config(variant: str, n: int, hidden: int):
    from peft import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig

    enc = max(32, hidden // 4)
    if variant == "prompt":
        return PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=n)
    if variant == "ptuning-mlp":
        return PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=n, encoder_hidden_size=enc)
    if variant == "ptuning-lstm":
        return PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=n, encoder_hidden_size=enc,
                                   encoder_reparameterization_type="LSTM")
    if variant == "prefix":
        return PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=n)
    if variant == "prefix-proj":
        return PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=n, prefix_projection=True,
                                  encoder_hidden_size=enc)
    raise ValueError(variant)


def build_world(args, root: Path) -> World:
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    model_dir = root / "model"
    save_tiny_model(model_dir, "llama", seed=args.seed, hidden_size=args.hidden, num_layers=args.layers)
    rng = random.Random(args.seed)
    variants = [VARIANTS[i % len(VARIANTS)] for i in range(args.adapters)]
    virtual = [rng.randint(args.min_virtual, args.max_virtual) for _ in range(args.adapters)]
    trainer_base = AutoModelForCausalLM.from_pretrained(model_dir)  # float32, as training would save
    adapter_dirs = []
    for i, (variant, n) in enumerate(zip(variants, virtual)):
        torch.manual_seed(args.seed + 1000 + i)
        peft = get_peft_model(trainer_base, peft_config(variant, n, args.hidden))
        with torch.no_grad():
            for param in peft.parameters():
                if param.requires_grad:
                    param.add_(torch.randn_like(param) * 0.5)
        out = root / "adapters" / f"a{i:02d}-{variant}"
        peft.save_pretrained(out)
        adapter_dirs.append(out)
    del trainer_base

    base = load_base_model(str(model_dir), device=args.device, dtype=args.dtype)
    registry = AdapterRegistry(base.spec, base.model)
    t = time.perf_counter()
    adapters = [registry.add_dir(d.name, d, source="bench") for d in adapter_dirs]
    load_s = time.perf_counter() - t

    vocab = base.model.config.vocab_size
    requests = [
        Request(i, [rng.randrange(FIRST_ID, vocab) for _ in range(rng.randint(args.min_prompt, args.max_prompt))],
                i % args.adapters)
        for i in range(args.requests)
    ]
    return World(args, model_dir, base, adapter_dirs, variants, virtual, adapters, requests, load_s)
