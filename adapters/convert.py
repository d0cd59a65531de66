"""`softprompt-convert`: soft prompts saved by other tools -> PEFT's two files, ready to upload.

Runs on the user's machine, never in the server (which never unpickles anything). Every pickle is
read with `torch.load(weights_only=True)`, and the one class a soft prompt may be saved as besides
tensors, `torch.nn.Embedding`, is allow-listed for that call alone. What it reads:

- a `torch.save`d `nn.Embedding` (the widely copied soft-prompt-tuning code saves its
  `soft_prompt` module so), a plain tensor `[n, hidden]`, or a state dict holding one
  (`{"weight": ...}`, `{"prompt_embeddings": ...}`, ...); a `.safetensors` file of one tensor;
- IBM TGIS prompt files: `decoder.pt` (a tensor `[n, hidden]`; causal models), or a directory
  holding it (`encoder.pt` alone is for encoder-decoder models and refused);
- NVIDIA NeMo p-tuning `.nemo` archives: a tar whose `model_weights.ckpt` holds
  `prompt_table.prompt_table.<task>.prompt_embeddings.weight` (one per task: `--task`) or, newer,
  `...adapter_layer.ptuning_adapter.inference_table`;
- PEFT's own prompt-tuning directory (what vLLM's removed prompt adapters were): its table checked
  and written again as safetensors (an `adapter_model.bin` read with weights_only).

It writes `adapter_config.json` (PROMPT_TUNING, CAUSAL_LM, the base model's sizes) and
`adapter_model.safetensors` (one tensor, `prompt_embeddings [n, hidden]`), after checking the
width against the base model's config (read with AutoConfig: no weights are downloaded).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

import torch

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
TABLE_KEYS = ("prompt_embeddings", "weight", "embedding.weight", "soft_prompt.weight", "prompt_embeddings.weight",
              "embeddings", "soft_prompt")  # state-dict names a soft prompt is saved under, tried in order
NEMO_TABLE = ".prompt_table."  # old NeMo: prompt_table.prompt_table.<task>.prompt_embeddings.weight
NEMO_INFERENCE = "ptuning_adapter.inference_table"  # newer NeMo
SAFE_CLASSES = [torch.nn.Embedding]  # what weights_only=True may build besides tensors


class ConvertError(Exception):
    """A message for the user: what was read, and why it cannot be converted."""


@dataclass
class Found:
    table: torch.Tensor  # [n, hidden]
    kind: str  # what the input was, in words


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="softprompt-convert",
        description="Convert a soft prompt saved by another tool (torch.save'd nn.Embedding or tensor, TGIS "
                    "decoder.pt, NeMo p-tuning .nemo, PEFT/vLLM prompt adapter) into PEFT's adapter files.")
    parser.add_argument("input", type=Path, help="the saved soft prompt: a file, a .nemo archive or a directory")
    parser.add_argument("--base-model", required=True, help="the base model: a local directory or a hub id")
    parser.add_argument("--output", required=True, type=Path, help="directory to write the adapter into")
    parser.add_argument("--task", help="which task's prompt, where the input holds several (NeMo)")
    args = parser.parse_args(argv)
    try:
        found = read_soft_prompt(args.input, args.task)
        sizes = base_model_sizes(args.base_model)
        config = write_adapter(found.table, sizes, args.base_model, args.output)
    except ConvertError as exc:
        print(f"softprompt-convert: error: {exc}", file=sys.stderr)
        return 2
    n, hidden = found.table.shape
    print(f"found {found.kind}: {n} virtual tokens x {hidden}, {str(found.table.dtype).removeprefix('torch.')}")
    print(f"wrote {args.output / CONFIG_FILE} ({config['peft_type']}, base model {args.base_model}) and "
          f"{args.output / WEIGHTS_FILE}")
    return 0


# ---- reading ----------------------------------------------------------------------------------------

def read_soft_prompt(path: Path, task: str | None = None) -> Found:
    """The soft prompt [n, hidden] in `path`, whatever tool saved it."""
    path = Path(path)
    if not path.exists():
        raise ConvertError(f"{path} does not exist")
    if path.is_dir():
        return _read_dir(path, task)
    if path.suffix == ".nemo" or tarfile.is_tarfile(path):
        return _read_nemo(path, task)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return _from_object(load_file(str(path)), path.name, task)
    return _from_object(_torch_load(path.read_bytes(), path.name), path.name, task)


def _read_dir(path: Path, task: str | None) -> Found:
    if (path / CONFIG_FILE).is_file():
        return _read_peft(path)
    if (path / "decoder.pt").is_file():
        found = _from_object(_torch_load((path / "decoder.pt").read_bytes(), "decoder.pt"), "decoder.pt", task)
        return Found(found.table, "a TGIS prompt (decoder.pt)")
    if (path / "encoder.pt").is_file():
        raise ConvertError(f"{path} holds encoder.pt alone: TGIS saves that for encoder-decoder models; a causal "
                           "model's prompt is decoder.pt")
    raise ConvertError(f"{path} holds neither {CONFIG_FILE} (PEFT, vLLM) nor decoder.pt (TGIS): "
                       f"{sorted(p.name for p in path.iterdir())[:10]}")


def _read_peft(path: Path) -> Found:
    """PEFT's own prompt-tuning files (vLLM's prompt adapters were these): the table, checked."""
    try:
        config = json.loads((path / CONFIG_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise ConvertError(f"{path / CONFIG_FILE} is not valid JSON: {exc}") from None
    if config.get("peft_type") != "PROMPT_TUNING":
        raise ConvertError(f"{path / CONFIG_FILE} has peft_type {config.get('peft_type')!r}; this converts "
                           "PROMPT_TUNING (other PEFT kinds upload as they are)")
    if (path / WEIGHTS_FILE).is_file():
        from safetensors.torch import load_file

        tensors = load_file(str(path / WEIGHTS_FILE))
    elif (path / "adapter_model.bin").is_file():
        tensors = _torch_load((path / "adapter_model.bin").read_bytes(), "adapter_model.bin")
    else:
        raise ConvertError(f"{path} has {CONFIG_FILE} but neither {WEIGHTS_FILE} nor adapter_model.bin")
    found = _from_object(tensors, f"{path.name} weights", None)
    n = config.get("num_virtual_tokens")
    if n is not None and found.table.shape[0] != n:
        raise ConvertError(f"{path / CONFIG_FILE} says num_virtual_tokens={n}, its weights hold "
                           f"{found.table.shape[0]} rows")
    return Found(found.table, "a PEFT prompt-tuning adapter (vLLM's prompt-adapter format)")


def _read_nemo(path: Path, task: str | None) -> Found:
    try:
        with tarfile.open(path) as tar:
            members = [m for m in tar.getmembers() if m.isfile() and m.name.endswith("model_weights.ckpt")]
            if not members:
                raise ConvertError(f"{path} is a tar without model_weights.ckpt: is it a NeMo archive?")
            raw = tar.extractfile(members[0]).read()
    except tarfile.TarError as exc:
        raise ConvertError(f"{path} is not a readable tar (.nemo) archive: {exc}") from None
    state = _torch_load(raw, f"{path.name}:model_weights.ckpt")
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ConvertError(f"{path.name}:model_weights.ckpt holds a {type(state).__name__}, not a state dict")
    tables = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            continue
        if NEMO_TABLE in key and key.endswith(".prompt_embeddings.weight"):
            tables[key.split(NEMO_TABLE, 1)[1].removesuffix(".prompt_embeddings.weight")] = value
        elif NEMO_INFERENCE in key:
            tail = key.split(NEMO_INFERENCE, 1)[1].strip(".")
            tables[tail or "default"] = value
    if not tables:
        raise ConvertError(f"{path.name}:model_weights.ckpt holds no NeMo p-tuning prompt table "
                           f"(prompt_table.prompt_table.<task>.prompt_embeddings.weight or {NEMO_INFERENCE}); "
                           f"it holds: {_listing(state)}")
    if task is None:
        if len(tables) > 1:
            raise ConvertError(f"{path.name} holds prompts for {len(tables)} tasks: {sorted(tables)}; "
                               "name one with --task")
        task = next(iter(tables))
    if task not in tables:
        raise ConvertError(f"{path.name} has no task {task!r}; its tasks: {sorted(tables)}")
    return Found(_as_table(tables[task], f"{path.name} task {task!r}"), f"a NeMo p-tuning prompt (task {task!r})")


def _torch_load(raw: bytes, where: str):
    """torch.load with weights_only=True: tensors, plain containers and nn.Embedding, nothing else."""
    try:
        with torch.serialization.safe_globals(SAFE_CLASSES):
            return torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError, ... for what it refuses
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConvertError(f"{where} cannot be read safely (torch.load with weights_only=True, allowing tensors "
                           f"and nn.Embedding only): {first}") from None


def _from_object(obj, where: str, task: str | None) -> Found:
    """The table in what torch.load (or safetensors) gave: a module, a tensor or a state dict."""
    if isinstance(obj, torch.nn.Embedding):
        return Found(_as_table(obj.weight.detach(), where), "a torch.save'd nn.Embedding")
    if isinstance(obj, torch.Tensor):
        return Found(_as_table(obj.detach(), where), "a tensor")
    if isinstance(obj, dict):
        if isinstance(obj.get("state_dict"), dict):
            obj = obj["state_dict"]
        for key in TABLE_KEYS:
            if isinstance(obj.get(key), torch.Tensor):
                return Found(_as_table(obj[key].detach(), f"{where}[{key!r}]"), f"a state dict ({key!r})")
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if len(tensors) == 1:
            (key, value), = tensors.items()
            return Found(_as_table(value.detach(), f"{where}[{key!r}]"), f"a state dict ({key!r})")
        raise ConvertError(f"{where}: an unknown layout; expected one of the keys {list(TABLE_KEYS)} or a single "
                           f"tensor, found: {_listing(obj)}")
    raise ConvertError(f"{where} holds a {type(obj).__name__}: expected an nn.Embedding, a tensor or a state dict")


def _as_table(tensor: torch.Tensor, where: str) -> torch.Tensor:
    """[n, hidden] (a leading batch axis of 1 dropped), floating point."""
    while tensor.dim() > 2 and tensor.shape[0] == 1:
        tensor = tensor[0]
    if tensor.dim() != 2 or 0 in tensor.shape:
        raise ConvertError(f"{where} has shape {tuple(tensor.shape)}: a soft prompt is [num_virtual_tokens, hidden]")
    if not tensor.is_floating_point():
        raise ConvertError(f"{where} has dtype {tensor.dtype}: a soft prompt is floating point")
    if not torch.isfinite(tensor).all():
        raise ConvertError(f"{where} holds NaN or infinite values")
    return tensor.contiguous()


def _listing(state: dict, limit: int = 20) -> str:
    items = [f"{k} {tuple(v.shape)}" if isinstance(v, torch.Tensor) else f"{k} ({type(v).__name__})"
             for k, v in list(state.items())[:limit]]
    more = f", ... ({len(state) - limit} more)" if len(state) > limit else ""
    return ", ".join(items) + more if items else "nothing"


# ---- the base model and writing -----------------------------------------------------------------------

def base_model_sizes(model: str) -> dict[str, int]:
    """hidden size, layers and attention heads of `model`, from its config alone."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model)
    except Exception as exc:  # noqa: BLE001 - not found, no network, a bad config.json
        raise ConvertError(f"cannot read the config of base model {model!r}: {exc}") from None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    sizes = {}
    for key, names in (("hidden_size", ("hidden_size", "n_embd", "d_model")),
                       ("num_layers", ("num_hidden_layers", "n_layer", "num_layers")),
                       ("num_attention_heads", ("num_attention_heads", "n_head"))):
        value = next((getattr(text, n) for n in names if getattr(text, n, None) is not None), None)
        if value is None:
            raise ConvertError(f"the config of base model {model!r} has none of {names}")
        sizes[key] = value
    return sizes


def write_adapter(table: torch.Tensor, sizes: dict[str, int], base_model: str, output: Path) -> dict:
    """PEFT's adapter_config.json and adapter_model.safetensors for `table` [n, hidden] in `output`."""
    from safetensors.torch import save_file

    n, width = table.shape
    if width != sizes["hidden_size"]:
        raise ConvertError(f"the soft prompt is {width} wide, but base model {base_model!r} has hidden size "
                           f"{sizes['hidden_size']}: it was trained for another model")
    config = {
        "peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": n,
        "token_dim": width, "num_layers": sizes["num_layers"], "num_attention_heads": sizes["num_attention_heads"],
        "num_transformer_submodules": 1, "base_model_name_or_path": base_model, "inference_mode": True,
        "prompt_tuning_init": "RANDOM", "prompt_tuning_init_text": None, "tokenizer_name_or_path": None,
        "tokenizer_kwargs": None, "revision": None, "auto_mapping": None, "modules_to_save": None,
    }
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    save_file({"prompt_embeddings": table.detach().cpu().contiguous()}, str(output / WEIGHTS_FILE))
    (output / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return config


if __name__ == "__main__":
    sys.exit(main())
