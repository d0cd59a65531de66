"""A saved prefix is reused only by the weights it was computed with: a model retrained in place
(same directory, same config, new weights) materializes its adapters again."""

from __future__ import annotations

import torch

from adapters import AdapterRegistry, AdapterStore
from adapters.prefix_file import PREFIX_FILE, base_model_key
from server.demo.tiny import save_tiny_model
from server.model import load_base_model
from tests.factory import make_adapter


def _files(adapter_dir) -> tuple[bytes, bytes]:
    return tuple((adapter_dir / f).read_bytes() for f in ("adapter_config.json", "adapter_model.safetensors"))


def _registry(model_dir, store):
    """A registry as the server builds it at start-up: the store listed, prefixes keyed by `base_model_key`."""
    base = load_base_model(str(model_dir), dtype="float32")
    registry = AdapterRegistry(base.spec, base.model, store,
                               model_key=base_model_key(str(model_dir), None, base.model, base.spec.dtype))
    registry.load_store()
    return base, registry


def test_retrained_weights_do_not_reuse_saved_prefixes(tmp_path):
    model_dir = save_tiny_model(tmp_path / "model", "llama", seed=0)
    files = _files(make_adapter(model_dir, tmp_path / "adapter", "prompt"))
    store = AdapterStore(tmp_path / "store")
    first, registry = _registry(model_dir, store)
    computed = registry.add("soft", *files).kv
    assert (store.path("soft") / PREFIX_FILE).is_file()

    _, same = _registry(model_dir, store)  # a restart with the same weights: the saved prefix is read back
    assert torch.equal(same.get("soft").kv, computed)
    assert same.stats["prefix_reads"] == 1

    save_tiny_model(model_dir, "llama", seed=1)  # retrained in place: same config, other weights
    retrained, registry = _registry(model_dir, store)
    assert retrained.model.config.to_dict() == first.model.config.to_dict()
    served = registry.get("soft").kv
    assert registry.stats["prefix_reads"] == 0, "a prefix computed with the old weights was reused"
    fresh = AdapterRegistry(retrained.spec, retrained.model).add("fresh", *files, persist=False).kv
    assert torch.equal(served, fresh) and not torch.equal(served, computed)

    _, again = _registry(model_dir, store)  # and the prefix saved for the new weights is theirs
    assert torch.equal(again.get("soft").kv, fresh) and again.stats["prefix_reads"] == 1
