"""The event loop never touches adapter files: listing adapters (`/v1/models`, `GET /adapters`) reads
no file on it, `/v1/models` stays cheap with 10,000 registered adapters, and a request for an
adapter evicted between two looks never loads it on the loop.

The app runs in-process (Starlette's TestClient runs it on an event loop in a thread of its own);
file access is watched by wrapping `pathlib.Path`'s reading methods and noting which happen on a
thread that runs an event loop. The engine runs a model of its own: building one over the shared
`llama` model would change the kernels that model's forwards take in later tests.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from adapters import AdapterRegistry, AdapterStore

N_ADAPTERS = 10_000


def _on_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


@pytest.fixture
def loop_reads(monkeypatch, tmp_path) -> list[tuple[str, str]]:
    """(method, path) of every read of a file under tmp_path made on an event loop's thread."""
    seen: list[tuple[str, str]] = []

    def watch(method: str):
        original = getattr(Path, method)

        def watched(self, *args, **kwargs):
            if _on_event_loop() and str(self).startswith(str(tmp_path)):
                seen.append((method, str(self)))
            return original(self, *args, **kwargs)

        monkeypatch.setattr(Path, method, watched)

    for method in ("read_bytes", "read_text", "open", "stat", "resolve", "is_file", "exists", "is_dir"):
        watch(method)
    return seen


class NamesOnly:
    """A store of many adapters whose files are never there: only a listing of names."""

    source = "disk"
    url = "names-only"

    def __init__(self, root: Path, n: int):
        self.root = root
        self._names = [f"adapter-{i:05d}" for i in range(n)]

    def names(self) -> list[str]:
        return self._names

    def path(self, name: str) -> Path:
        return self.root / name

    def exists(self, name: str) -> bool:
        return False

    def version(self, name: str) -> str | None:
        return "v0" if name in self._names else None


@pytest.fixture(scope="module")
def base(llama):
    """The tiny llama, loaded again for this module's engines and registries."""
    from server.model import load_base_model

    return load_base_model(str(llama.model_dir), dtype="float32")


def _app_client(base, registry: AdapterRegistry):
    from fastapi.testclient import TestClient

    from server.api.app import create_app
    from server.api.service import Service
    from server.config import Config
    from server.engine.async_engine import AsyncEngine
    from server.engine.engine import Engine

    engine = AsyncEngine(Engine(base.model, base.tokenizer, base.spec, max_batch_size=4,
                                kv_cache_bytes=4 * 2**20))
    service = Service(Config(model=base.name, dtype="float32"), base, registry, engine)
    return TestClient(create_app(service)), service


def test_v1_models_reads_no_file_and_is_cheap_at_10000_adapters(base, tmp_path, loop_reads):
    registry = AdapterRegistry(base.spec, base.model, NamesOnly(tmp_path / "store", N_ADAPTERS))
    registry.load_store()
    client, _ = _app_client(base, registry)
    with client:
        client.get("/v1/models")  # warm
        loop_reads.clear()
        started = time.perf_counter()
        r = client.get("/v1/models")
        seconds = time.perf_counter() - started
    assert r.status_code == 200, r.text
    ids = [m["id"] for m in r.json()["data"]]
    assert len(ids) == N_ADAPTERS + 1 and ids[1] == "adapter-00000"
    assert loop_reads == [], f"{len(loop_reads)} file reads on the event loop, the first: {loop_reads[:3]}"
    assert seconds < 2.0, f"/v1/models took {seconds:.2f}s for {N_ADAPTERS} adapters"


def test_listing_reads_no_file_on_the_event_loop(base, llama, tmp_path, loop_reads):
    store = AdapterStore(tmp_path / "store")
    for variant in ("prompt", "prefix", "ptuning-mlp"):
        store.save(f"stored-{variant}", *llama.files(variant))
    registry = AdapterRegistry(base.spec, base.model, store)
    registry.load_store()  # registered by name: nothing read yet
    client, _ = _app_client(base, registry)
    with client:
        loop_reads.clear()
        page = client.get("/adapters", params={"limit": 2})
        rest = client.get("/adapters", params={"after": page.json()["next_after"]})
        one = client.get("/adapters/stored-prefix")
        models = client.get("/v1/models")
    assert loop_reads == [], loop_reads
    described = {a["name"]: a for a in page.json()["adapters"] + rest.json()["adapters"]}
    assert sorted(described) == ["stored-prefix", "stored-prompt", "stored-ptuning-mlp"]
    assert described["stored-prompt"]["peft_type"] == "PROMPT_TUNING"  # still told, not materialized
    assert described["stored-ptuning-mlp"]["num_virtual_tokens"] == 7
    assert not any(a["resident"] for a in described.values())
    assert one.json()["peft_type"] == "PREFIX_TUNING" and one.json()["version"]
    assert [m["id"] for m in models.json()["data"]][1:] == sorted(described)


def test_an_adapter_evicted_between_two_looks_is_not_loaded_on_the_event_loop(base, llama, tmp_path):
    """`Service.adapter` once asked `resident()` and then `get()`: an eviction in between (another
    request's load filling the cache) made `get()` a cold load on the event loop."""
    store = AdapterStore(tmp_path / "store")
    registry = AdapterRegistry(base.spec, base.model, store)
    registry.add("evicted", *llama.files("prompt"))
    assert registry.resident("evicted")
    _, service = _app_client(base, registry)
    key = registry._entries["evicted"].key

    def evict_after(method):
        def looked(*args, **kwargs):
            answer = method(*args, **kwargs)
            registry.cache.drop(key)  # the eviction that lands right after the look
            return answer
        return looked

    loads_on_loop: list[bool] = []
    materialize = registry._materialize

    def watched_materialize(entry, *args):
        loads_on_loop.append(_on_event_loop())
        return materialize(entry, *args)

    registry.resident = evict_after(registry.resident)
    registry._materialize = watched_materialize

    adapter = asyncio.run(service.adapter("evicted"))
    assert adapter.name == "evicted"
    assert True not in loads_on_loop, "a cold load ran on the event loop"
    registry.cache.drop(key)  # evicted for real: loaded again, on a worker thread
    assert asyncio.run(service.adapter("evicted")).name == "evicted"
    assert loads_on_loop and True not in loads_on_loop
