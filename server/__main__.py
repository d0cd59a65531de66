"""`python -m server` / `softprompt-server`: load the model and adapters, then serve HTTP.

On SIGTERM (or Ctrl-C) the server drains: new requests get 503, running ones finish (up to
--shutdown-timeout, after which they are aborted), then it exits 0. A second Ctrl-C forces it.
"""

from __future__ import annotations

import gc
import logging
import signal
import sys
import time

from server import openmp

openmp.apply()  # before torch loads OpenMP

import torch
import uvicorn

from adapters import AdapterRegistry, SourceUnavailable, open_store
from adapters.loading import Limits
from adapters.prefix_file import base_model_key
from server.api.app import create_app
from server.api.service import Service
from server.config import Config, load_config, parse_cpu_threads, parse_memory
from server.engine.cpu.threads import plan_threads
from server.engine.async_engine import AsyncEngine
from server.engine.engine import Engine
from server.engine.kv_cache import budget_bytes
from server.engine.request import Overloaded
from server.engine.self_check import SelfCheckFailed
from server.model import DEMO_ADAPTERS, load_base_model

log = logging.getLogger("softprompt")
DEFAULT_ADAPTER_DIR = "adapter-store"
DEFAULT_S3_CACHE_DIR = "adapter-cache"  # an s3:// store's disk cache, without --adapter-dir


def build_service(config: Config) -> Service:
    # torch's CPU threads go to the engine thread alone. OpenMP keeps a pool of workers per calling
    # thread: once this (the main) thread has run parallel torch ops, its pool competes with the
    # engine's, and every CPU forward on the engine thread took about twice as long (measured:
    # 97-token prefill 60 ms -> 106-185 ms). So this thread works single-threaded from here on.
    default_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:  # first, so that a store that cannot be reached stops start-up before the model loads
        store = open_store(config.adapter_store or config.adapter_dir or DEFAULT_ADAPTER_DIR,
                           cache_dir=config.adapter_dir or DEFAULT_S3_CACHE_DIR, endpoint_url=config.s3_endpoint_url)
    except SourceUnavailable as exc:
        raise SystemExit(f"refusing to start: {exc}") from exc
    base = load_base_model(config.model, config.device, config.dtype, config.revision, name=config.model_name)
    try:
        threads = plan_threads(parse_cpu_threads(config.cpu_threads), default=default_threads)
    except ValueError as exc:
        raise SystemExit(f"refusing to start: --cpu-threads {config.cpu_threads}: {exc}") from exc
    log.info("engine: %s", threads.describe())
    kv_bytes = budget_bytes(parse_memory(config.kv_cache_memory), base.spec.device)
    try:
        engine = AsyncEngine(Engine(base.model, base.tokenizer, base.spec, max_batch_size=config.max_batch_size,
                                    max_waiting=config.max_waiting, max_prefill_tokens=config.max_prefill_tokens,
                                    kv_cache_bytes=kv_bytes, compile=config.compile == "on", paths=config.fast_paths,
                                    check=True),
                             threads=threads)
    except (ValueError, SelfCheckFailed) as exc:  # a fast path forced on that cannot run; a wrong plain forward
        raise SystemExit(f"refusing to start: {exc}") from exc
    log.info("engine paths: %s", engine.engine.runner.describe())
    pool = engine.engine.runner.pool
    log.info("KV cache: %.2f GiB, %d tokens (--kv-cache-memory %s)", pool.nbytes() / 2**30, pool.slots,
             config.kv_cache_memory)
    if pool.slots < config.max_input_tokens + config.max_new_tokens:
        log.warning("the KV cache holds %d tokens, fewer than --max-input-tokens + --max-new-tokens (%d): longer "
                    "requests will be refused", pool.slots, config.max_input_tokens + config.max_new_tokens)
    # Materializing an adapter is a model forward: on the engine thread, between steps, once serving.
    cache = parse_memory(config.adapter_cache_memory)
    cache_bytes = int(cache * pool.nbytes()) if isinstance(cache, float) else cache or pool.nbytes() // 4
    pinned = frozenset(n.strip() for n in (config.pin_adapters or "").split(",") if n.strip())
    registry = AdapterRegistry(base.spec, base.model, store, run_model=engine.run_between_steps,
                               limits=Limits(max_virtual_tokens=config.max_virtual_tokens),
                               max_adapters=config.max_adapters, cache_bytes=cache_bytes, pinned=pinned,
                               model_key=base_model_key(base.name, config.revision, base.model, base.spec.dtype))
    log.info("adapter cache: %.1f MiB of materialized prefixes%s", cache_bytes / 2**20,
             f", pinned: {', '.join(sorted(pinned))}" if pinned else "")
    if config.model is None and DEMO_ADAPTERS.is_dir():
        for path in sorted(p for p in DEMO_ADAPTERS.iterdir() if p.is_dir()):
            if not store.exists(path.name):
                registry.add_dir(path.name, path, source="demo", persist_prefix=False)
    try:
        failed = registry.load_store()
    except SourceUnavailable as exc:
        raise SystemExit(f"refusing to start: {exc}") from exc
    log.info("registered %d adapters from %s%s", len(registry), store.url,
             f" ({len(failed)} failed: {', '.join(failed)})" if failed else "")
    return Service(config, base, registry, engine)


class DrainingServer(uvicorn.Server):
    """uvicorn, but a stop signal first drains the engine instead of closing at once."""

    def __init__(self, config: uvicorn.Config, service: Service):
        super().__init__(config)
        self.service = service
        self.drain_deadline: float | None = None

    def handle_exit(self, sig, frame) -> None:
        # Not recording the signal: uvicorn would re-raise it after shutdown and exit non-zero.
        if self.drain_deadline is None:
            log.info("received %s: draining (up to %.0fs)", signal.Signals(sig).name,
                     self.service.config.shutdown_timeout)
            self.service.draining = True
            self.service.engine.engine.accepting = False
            self.drain_deadline = time.monotonic() + self.service.config.shutdown_timeout
        elif sig == signal.SIGINT:
            self.should_exit = self.force_exit = True

    async def on_tick(self, counter: int) -> bool:
        if self.drain_deadline is not None and not self.should_exit:
            if self.service.idle():
                self.should_exit = True
            elif time.monotonic() > self.drain_deadline:
                log.warning("shutdown timeout: aborting the requests still running")
                self.service.engine.engine.abort_all(Overloaded("the server shut down before the request finished", 5))
                self.should_exit = True
        return await super().on_tick(counter)


def freeze_startup_heap() -> int:
    """Put every object alive after start-up out of the garbage collector's reach; returns how many.

    Start-up leaves about 420,000 objects that live as long as the process (transformers' and
    torch's modules, the tokenizer, the app's routes and schemas). Python's full collections walk
    them all: 200-280 ms each on the bench model, holding the GIL, so every stream stalled for that
    long, and a third of the event loop's CPU went to collecting. Frozen, a full collection walks
    only what was made since (about 19,000 objects while serving). vLLM's API server does the same.
    A frozen object dropped later (an adapter evicted from the cache) is still freed by reference
    counting; only a reference cycle among frozen objects would outlive its use.
    """
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def main(argv: list[str] | None = None) -> None:
    config = load_config(argv)
    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    service = build_service(config)
    uv_config = uvicorn.Config(create_app(service), host=config.host, port=config.port, log_level=config.log_level,
                               timeout_graceful_shutdown=5, access_log=False)
    log.info("start-up heap: %d objects frozen out of the garbage collector's reach", freeze_startup_heap())
    DrainingServer(uv_config, service).run()
    log.info("stopped")
    sys.exit(0)


if __name__ == "__main__":
    main()
