"""An adapter's materialized KV prefix, saved next to its PEFT files so a cold load needs no model forward.

`prefix.safetensors` holds one tensor, `kv [layers, 2, kv_heads, n, head_dim]`, and in its metadata
the base model it was computed with (`model_key`: model id, revision, config, dtype and a fingerprint
of the weights, hashed) and the adapter version it was computed from. A file whose record does not match the running model or
the adapter's files is ignored (and recomputed); the PEFT files stay the source of truth.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .spec import ModelSpec

log = logging.getLogger(__name__)
PREFIX_FILE = "prefix.safetensors"


FINGERPRINT_SAMPLES = 1024  # values of each weight tensor that `weights_fingerprint` reads


def model_key(model_id: str, revision: str | None, config: dict, dtype: torch.dtype, weights: str = "") -> str:
    """Which base model a prefix belongs to: the same key means the same keys and values.
    weights: `weights_fingerprint` of the model (a model retrained in place keeps its id and config)."""
    record = json.dumps({"model": model_id, "revision": revision, "config": config, "dtype": str(dtype),
                         "weights": weights}, sort_keys=True, default=str)
    return hashlib.sha256(record.encode()).hexdigest()[:24]


def base_model_key(model_id: str, revision: str | None, model, dtype: torch.dtype) -> str:
    """`model_key` of a loaded transformers model: what the server saves its prefixes under."""
    return model_key(model_id, revision, model.config.to_dict(), dtype, weights=weights_fingerprint(model))


@torch.no_grad()
def weights_fingerprint(model: torch.nn.Module, samples: int = FINGERPRINT_SAMPLES) -> str:
    """A hash of the weights, cheap at any size: every tensor's name, shape and dtype, and `samples`
    of its values evenly spaced from its first to its last (the same positions every time), not
    every byte. Retraining changes nearly every value, so a sample of each tensor tells it; an
    edit of a few values between the sampled ones would go unseen. One transfer from the device."""
    h = hashlib.sha256()
    picked = []
    for name, tensor in model.state_dict().items():
        h.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype};".encode())
        flat = tensor.detach().reshape(-1)
        if flat.numel() == 0 or flat.is_meta:
            continue
        at = torch.linspace(0, flat.numel() - 1, min(samples, flat.numel()), dtype=torch.float64, device=flat.device)
        picked.append(flat[at.long()].to(torch.float32))
    if picked:
        h.update(torch.cat([p.to(picked[0].device) for p in picked]).cpu().numpy().tobytes())
    return h.hexdigest()[:24]


def prefix_path(directory: Path, task: int | None = None) -> Path:
    """Where an adapter's saved prefix is: `prefix.safetensors`, or `prefix.task{N}.safetensors` for
    task N of an adapter with tasks (multitask prompt tuning: a prefix per task)."""
    return Path(directory) / (PREFIX_FILE if task is None else f"prefix.task{task}.safetensors")


def save_prefix(directory: Path, kv: torch.Tensor, key: str, version: str, task: int | None = None) -> None:
    """Write atomically (a temporary file renamed into place); a failure is logged, never raised:
    the prefix can always be computed again."""
    target = prefix_path(directory, task)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}")
    try:
        save_file({"kv": kv.detach().to("cpu").contiguous()}, str(tmp), metadata={"model_key": key, "version": version})
        os.replace(tmp, target)
    except OSError as exc:
        log.warning("could not save the materialized prefix in %s: %s", directory, exc)
        tmp.unlink(missing_ok=True)


def load_prefix(directory: Path, key: str, version: str, spec: ModelSpec, n: int,
                task: int | None = None) -> torch.Tensor | None:
    """The saved prefix (of `task`) on the model's device, if it was computed for this model and version
    and has the shape `n` virtual tokens give; else None."""
    path = prefix_path(directory, task)
    if not path.is_file():
        return None
    want = (spec.num_layers, 2, spec.num_kv_heads, n, spec.head_dim)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("model_key") != key or meta.get("version") != version:
                return None
            if tuple(f.get_slice("kv").get_shape()) != want:
                log.warning("ignoring %s: shape %s, expected %s", path, f.get_slice("kv").get_shape(), want)
                return None
            kv = f.get_tensor("kv")
    except (SafetensorError, OSError, KeyError) as exc:
        log.warning("ignoring unreadable %s: %s", path, exc)
        return None
    return kv.to(spec.device, spec.dtype).contiguous()
