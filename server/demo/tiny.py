"""Tiny Hugging Face models and a byte-level tokenizer, built from configs with no download.

Used by the built-in demo, the tests and the benchmarks: each saves a real model directory with
`save_pretrained`, which is then loaded through the same path as any hub model.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>"]  # ids 0, 1, 2; the 256 bytes follow
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
VOCAB_SIZE = len(SPECIAL_TOKENS) + 256

ARCHITECTURES = ("llama", "gpt2", "qwen2")


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A lossless byte-level tokenizer: one token per byte, plus pad, bos and eos."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    vocab.update({ch: len(SPECIAL_TOKENS) + i for i, ch in enumerate(sorted(alphabet))})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        chat_template=CHAT_TEMPLATE,
    )


def tiny_config(arch: str = "llama", hidden_size: int = 64, num_layers: int = 2, **overrides):
    """A small config of `arch`; llama uses grouped-query attention (4 heads, 2 kv heads)."""
    common = dict(vocab_size=VOCAB_SIZE, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if arch == "gpt2":
        kwargs = dict(n_embd=hidden_size, n_layer=num_layers, n_head=4, n_positions=1024)
    elif arch in ("llama", "qwen2", "mistral"):
        heads = max(4, hidden_size // 64)
        kwargs = dict(
            hidden_size=hidden_size,
            intermediate_size=hidden_size * 4 if arch != "llama" else hidden_size * 8 // 3 // 8 * 8,
            num_hidden_layers=num_layers,
            num_attention_heads=heads,
            num_key_value_heads=heads // 2,
            max_position_embeddings=4096,
            tie_word_embeddings=arch == "qwen2",
        )
    else:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose from {ARCHITECTURES}")
    kwargs.update(common)
    kwargs.update(overrides)
    return AutoConfig.for_model(arch, **kwargs)


def save_tiny_model(path: str | Path, arch: str = "llama", seed: int = 0, **config_kwargs) -> Path:
    """Build a randomly initialised tiny model and its tokenizer and save both under `path`."""
    path = Path(path)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **config_kwargs))
    seeded_init(model, seed)
    model.generation_config.pad_token_id = 0
    model.save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


@torch.no_grad()
def seeded_init(model: torch.nn.Module, seed: int, std: float = 0.2, bias_std: float = 0.1,
                norm_std: float = 0.1) -> None:
    """Overwrite every weight from `seed` alone, so the same seed gives the same model under any
    transformers release (its own initialisation order and scheme change between releases, and
    the tests' golden references depend on these weights). Weights are normal(0, std), a large std
    keeping greedy output from repeating one token; biases normal(0, bias_std) and norm scales
    1 + normal(0, norm_std), neither 0 nor 1, so a forward that dropped a bias or a norm's scale
    would give other tokens than transformers'.
    """
    for name, param in sorted(model.named_parameters()):
        generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        noise = torch.randn(param.shape, generator=generator)
        if name.endswith("bias"):
            param.copy_(noise * bias_std)
        elif param.dim() == 1:  # RMSNorm / LayerNorm scales
            param.copy_(1.0 + noise * norm_std)
        else:
            param.copy_(noise * std)
