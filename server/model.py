"""Loading the one frozen base model and its tokenizer, on the chosen device and dtype."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from adapters import ModelSpec
from server.engine import rope
from server.engine.cpu import linear as cpu_linear

log = logging.getLogger(__name__)

DEMO_DIR = Path(__file__).parent / "demo" / "assets"
DEMO_MODEL = DEMO_DIR / "model"
DEMO_ADAPTERS = DEMO_DIR / "adapters"

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class BaseModel:
    model: torch.nn.Module  # frozen: eval mode, no gradients
    tokenizer: object  # a transformers tokenizer with a pad token
    spec: ModelSpec
    name: str  # what clients call it (OpenAI `model`)
    dtype_reason: str = ""  # why this dtype (`pick_dtype`)

    @property
    def max_positions(self) -> int | None:
        """The longest sequence served: the model's positions, stretched by dynamic RoPE scaling (`rope.py`)."""
        config = self.model.config
        positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        return rope.served_positions(config, positions) if positions else None


def pick_device(flag: str) -> torch.device:
    if flag == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(flag)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {flag}: CUDA is not available on this machine")
    return device


def pick_dtype(flag: str, device: torch.device) -> tuple[torch.dtype, str]:
    """The dtype `--dtype flag` gives on `device`, and why (the log and /info say it)."""
    if flag != "auto":
        return DTYPES[flag], f"--dtype {flag}"
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, "--dtype auto on a GPU that supports bfloat16"
        return torch.float16, "--dtype auto on a GPU without bfloat16"
    if cpu_has_bf16():
        return torch.bfloat16, ("--dtype auto on a CPU that computes bfloat16 natively (AVX512-BF16 or AMX); "
                                "--dtype float32 to override")
    return torch.float32, "--dtype auto on a CPU without native bfloat16 (AVX512-BF16 or AMX)"


def cpu_has_bf16() -> bool:
    """AVX512-BF16 or AMX tiles, as vLLM checks before picking bfloat16 on CPU."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def load_base_model(model: str | None, device: str = "auto", dtype: str = "auto", revision: str | None = None,
                    name: str | None = None) -> BaseModel:
    """Load a hub id or local directory (the built-in demo model when `model` is None)."""
    source = str(model) if model else str(DEMO_MODEL)
    dev = pick_device(device)
    dt, why = pick_dtype(dtype, dev)
    log.info("loading base model %s on %s as %s (%s)", source, dev, dt, why)
    if dev.type == "cpu":
        cpu_linear.size_caches(dt)
    hf_model = AutoModelForCausalLM.from_pretrained(source, dtype=dt, revision=revision)
    hf_model.to(dev).eval().requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(source, revision=revision)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    spec = ModelSpec.from_hf_config(hf_model.config, dev, dt)
    return BaseModel(hf_model, tokenizer, spec, name or (model if model else "softprompt-demo"), why)
