"""Soft prompts as other tools save them (for `softprompt-convert`'s tests), and PEFT's greedy tokens
for a table served through a PromptTuningConfig PeftModel with its embedding set to it."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import torch

NUM_VIRTUAL_TOKENS = 4


def table(hidden: int, seed: int = 0) -> torch.Tensor:
    """A soft prompt [n, hidden], large enough to change the greedy tokens."""
    return torch.randn(NUM_VIRTUAL_TOKENS, hidden, generator=torch.Generator().manual_seed(seed)) * 1.5


def save_format(fmt: str, prompt: torch.Tensor, root: Path) -> tuple[Path, list[str]]:
    """`prompt` saved as `fmt`; the path to convert and the extra converter arguments."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    if fmt == "embedding":  # the soft-prompt-tuning blog code: torch.save(self.soft_prompt, "soft_prompt.model")
        module = torch.nn.Embedding(*prompt.shape)
        with torch.no_grad():
            module.weight.copy_(prompt)
        torch.save(module, root / "soft_prompt.model")
        return root / "soft_prompt.model", []
    if fmt == "tensor":
        torch.save(prompt.clone(), root / "prompt.pt")
        return root / "prompt.pt", []
    if fmt == "state-dict":
        torch.save({"prompt_embeddings": prompt.clone()}, root / "prompt.pt")
        return root / "prompt.pt", []
    if fmt == "tgis":
        (root / "tgis").mkdir(exist_ok=True)
        torch.save(prompt.clone().to(torch.float16).float(), root / "tgis" / "decoder.pt")
        return root / "tgis", []
    if fmt in ("nemo", "nemo-new"):
        if fmt == "nemo":  # two tasks: the right one is picked with --task
            state = {f"prompt_table.prompt_table.{task}.prompt_embeddings.weight": t
                     for task, t in (("other", prompt.flip(0).clone()), ("squad", prompt.clone()))}
            state["frozen_model.model.embedding.word_embeddings.weight"] = torch.zeros(3, prompt.shape[1])
            args = ["--task", "squad"]
        else:
            state = {"model.language_model.adapter_layer.ptuning_adapter.inference_table": prompt.clone()}
            args = []
        buffer = io.BytesIO()
        torch.save({"state_dict": state}, buffer)
        with tarfile.open(root / "ptuned.nemo", "w") as tar:
            for name, data in (("model_config.yaml", b"target: p_tuning\n"), ("./model_weights.ckpt", buffer.getvalue())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        return root / "ptuned.nemo", args
    raise ValueError(fmt)


def peft_greedy_for_table(model_dir: Path, prompt: torch.Tensor, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """PeftModel.generate's greedy tokens with `prompt` as a prompt-tuning embedding."""
    from peft import PromptTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tests import oracle

    oracle.require_live()
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = get_peft_model(base, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=prompt.shape[0]))
    with torch.no_grad():
        model.prompt_encoder["default"].embedding.weight.copy_(prompt)
    model.eval()
    ids = torch.tensor([prompt_ids])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, pad_token_id=0)
    tokens = out[0, len(prompt_ids):].tolist()
    eos = model.config.eos_token_id
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens
