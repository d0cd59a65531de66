"""The same HTTP API on Ray Serve: one ingress, N engine replicas multiplexed by adapter, one store.

    serve run server.ray_serve:app model=DIR adapter_store=s3://bucket/prefix replicas=2 dtype=float32

Every argument but the few below is a server flag (`max_batch_size=32` is `--max-batch-size 32`),
read by `server.config.load_config`, so the replicas take exactly the single server's settings:
- `replicas`: engine replicas (default 1); or `min_replicas` and `max_replicas` for Serve's
  autoscaling on ongoing requests (`target_ongoing_requests`, default half of --max-batch-size);
- `num_gpus`: GPUs per replica (default 1 where Ray sees a GPU, else 0);
- `num_cpus`: CPUs per replica (default 1);
- `adapters_per_replica`: how many adapters Serve remembers as loaded on a replica (default 128).

Layout. `Ingress` is a FastAPI app on Serve's HTTP proxy. It reads only which adapter a request
is for (`parameters.adapter_id` on TGI's routes, `model` on OpenAI's) and forwards the request as
it came to `Engine` through a `DeploymentHandle` with `multiplexed_model_id` = that adapter, so
Serve's router sends it to a replica that has the adapter loaded (the base model's requests carry
"", which Serve routes by load alone). Each `Engine` replica is one whole single server
(`build_service` and the app of `server/api/app.py`), called in-process as an ASGI app; its
response comes back as a stream of chunks: first the status and headers, then the body as the app
sends it, so SSE streams stay streams. Adapter uploads, replaces and deletes go to any replica,
which validates, materializes and stores them once; every replica sees the store's changes on
use within about a second (the registry checks the stored version, `AdapterRegistry.recheck_s`).

Every response carries `x-replica`: the Serve replica that answered. A replica that dies with
requests in flight gives them a 503 (before their response started; a stream already started ends
with an error event in its route's format, as the single server ends a stream that fails), Serve
restarts it, and later requests go to the others meanwhile.

Nothing here knows the routes' insides: auth, limits, errors and metrics are the single server's.
`/metrics` and `/info` answer for the one replica the request reached.
"""

# No `from __future__ import annotations`: FastAPI must see `Request` itself in the signature Serve
# rewrites for the ingress's method.
import asyncio
import json
import logging
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from server import openmp
from server.config import Config, load_config

log = logging.getLogger("softprompt.ray_serve")
REPLICA_HEADER = "x-replica"
GENERATION_PATHS = {"/", "/generate", "/generate_stream", "/v1/completions", "/v1/chat/completions"}
SERVE_ARGS = ("replicas", "min_replicas", "max_replicas", "num_gpus", "num_cpus", "adapters_per_replica")
# The ingress's router asks a replica for its queue length before sending it a request, and takes
# a replica slower to answer than 0.1 s (Serve's default) as busy, routing the request elsewhere:
# a replica whose engine keeps its cores busy is given 1 s, so that its adapters stay with it.
ROUTER_ENV = {"RAY_SERVE_QUEUE_LENGTH_RESPONSE_DEADLINE_S": "1.0", "RAY_SERVE_MAX_QUEUE_LENGTH_RESPONSE_DEADLINE_S": "2.0"}
BASE_MODEL_ID = ""  # the multiplexed id of requests without an adapter: routed by load alone


def replica_id() -> str:
    """This Serve replica's id (unique across restarts)."""
    return serve.get_replica_context().replica_id.unique_id


def adapter_of(path: str, body: bytes) -> str:
    """The adapter a generation request names, as the routes read it; "" for the base model or for
    a body the engine's own validation will refuse."""
    if path not in GENERATION_PATHS:
        return BASE_MODEL_ID
    try:
        payload = json.loads(body)
    except ValueError:
        return BASE_MODEL_ID
    if not isinstance(payload, dict):
        return BASE_MODEL_ID
    if path.startswith("/v1/"):
        name = payload.get("model")
    else:
        parameters = payload.get("parameters")
        name = parameters.get("adapter_id") if isinstance(parameters, dict) else None
    return name if isinstance(name, str) else BASE_MODEL_ID


class Engine:
    """One engine replica: a whole single server, its HTTP app called in-process."""

    def __init__(self, config: Config):
        from server.__main__ import build_service, freeze_startup_heap
        from server.api.app import create_app

        logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.service = build_service(config)
        self.app = create_app(self.service)
        self.replica = replica_id().encode()
        self.started = False
        freeze_startup_heap()

    async def load(self, adapter: str) -> str:
        """Serve's multiplexed loader (wrapped in `deployment`): the adapter materialized here, so
        that Serve routes its next requests to this replica. An adapter that fails to load is not
        remembered; the request then gets the route's own error."""
        await self.service.adapter(adapter)
        return adapter

    async def forward(self, method: str, path: str, query: bytes, headers: list[tuple[bytes, bytes]],
                      body: bytes) -> AsyncIterator[dict | bytes]:
        """The app's response to one request: `{"status", "headers"}`, then the body's chunks."""
        if not self.started:  # here, on the replica's event loop: the engine hands tokens over to it
            self.service.engine.start()
            self.started = True
        adapter = serve.get_multiplexed_model_id()
        if adapter:
            try:
                await self.load(adapter)
            except Exception as exc:  # noqa: BLE001 - the route answers it (404, 422, ...)
                log.debug("adapter %r not loaded: %s", adapter, exc)
        messages: asyncio.Queue = asyncio.Queue()
        gone = asyncio.Event()
        sent = False

        async def receive():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        async def run():
            try:
                await self.app(scope, receive, messages.put)
            finally:
                messages.put_nowait(None)

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
                 "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": query, "root_path": "",
                 "headers": headers, "client": ("127.0.0.1", 0), "server": ("127.0.0.1", 80), "state": {}}
        task = asyncio.ensure_future(run())
        try:
            while (message := await messages.get()) is not None:
                if message["type"] == "http.response.start":
                    yield {"status": message["status"],
                           "headers": [*message.get("headers", []), (REPLICA_HEADER.encode(), self.replica)]}
                elif message["type"] == "http.response.body":
                    if message.get("body"):
                        yield message["body"]
                    if not message.get("more_body"):
                        break
        finally:  # the caller went away, or the response ended: the app sees a disconnect
            gone.set()
            await task

    async def check_health(self) -> None:
        """Serve's health check: a replica whose engine cannot run is restarted."""
        if self.started and not self.service.engine.alive:
            raise RuntimeError("the engine thread has stopped")


def _joined(headers: list[tuple[str, str]]) -> dict[str, str]:
    """Headers as the dict StreamingResponse takes (a repeated header's values joined)."""
    out: dict[str, str] = {}
    for k, v in headers:
        out[k] = f"{out[k]}, {v}" if k in out else v
    return out


STOPPED = "the engine replica serving this request stopped; retry"


def _unavailable_body(path: str, message: str) -> dict:
    """An `unavailable` error in the shape of `path`'s API (OpenAI's on /v1, else TGI's)."""
    if path.startswith("/v1/"):
        return {"error": {"message": message, "type": "server_error", "param": None, "code": "unavailable"}}
    return {"error": message, "error_type": "unavailable"}


ingress_app = FastAPI(title="softprompt-server on Ray Serve")


@serve.ingress(ingress_app)
class Ingress:
    """Forwards every request to an engine replica, by adapter; answers 503 when none can take it."""

    def __init__(self, engine: DeploymentHandle):
        self.engine = engine
        self.replica = replica_id()

    @ingress_app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"])
    async def proxy(self, request: Request) -> Response:
        body = await request.body()
        path = request.url.path
        headers = [(k, v) for k, v in request.headers.raw if k.lower() != REPLICA_HEADER.encode()]
        handle = self.engine.options(multiplexed_model_id=adapter_of(path, body), stream=True)
        chunks = handle.forward.remote(request.method, path, request.url.query.encode(), headers, body)
        try:
            head = await chunks.__anext__()
        except (RayActorError, ActorUnavailableError, BackPressureError) as exc:
            return self.unavailable(path, exc)
        except StopAsyncIteration:
            return self.unavailable(path, RuntimeError("the replica sent no response"))
        response_headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in head["headers"]]
        if not any(k.lower() == "content-length" for k, _ in response_headers):
            return StreamingResponse(self.rest(chunks, path), status_code=head["status"],
                                     headers=_joined(response_headers))
        try:  # a whole body: collected, so that a replica dying now still gets a clean 503
            content = b"".join([chunk async for chunk in chunks])
        except (RayActorError, ActorUnavailableError) as exc:
            return self.unavailable(path, exc)
        response = Response(content, status_code=head["status"])
        response.raw_headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in response_headers]
        return response

    async def rest(self, chunks, path: str) -> AsyncIterator[bytes]:
        """The rest of a stream; a replica that dies meanwhile ends it with an error event (the status
        is sent already), in the route's format: TGI's error message, or OpenAI's and `[DONE]`."""
        try:
            async for chunk in chunks:
                yield chunk
        except Exception as exc:  # noqa: BLE001 - whatever ended it (the actor died, its task failed, ...)
            log.warning("a stream from a replica failed: %s: %s", type(exc).__name__, exc)
            event = f"data: {json.dumps(_unavailable_body(path, STOPPED))}\n\n"
            yield (event + ("data: [DONE]\n\n" if path.startswith("/v1/") else "")).encode()

    def unavailable(self, path: str, exc: Exception) -> JSONResponse:
        died = isinstance(exc, (ActorDiedError, RayActorError, ActorUnavailableError))
        message = STOPPED if died else f"no engine replica can take the request now ({type(exc).__name__})"
        log.warning("503: %s: %s", message, exc)
        headers = {"Retry-After": "1", REPLICA_HEADER: self.replica}
        return JSONResponse(_unavailable_body(path, message), status_code=503, headers=headers)



def config_from(args: dict) -> Config:
    """The server's Config from a Serve application's args: each `key=value` is the flag `--key`."""
    argv = []
    for key, value in args.items():
        if key not in SERVE_ARGS and value is not None:
            argv += [f"--{key.replace('_', '-')}", str(value)]
    return load_config(argv)


def deployment(args: dict):
    """The application: the ingress bound to N engine replicas (module docstring for `args`)."""
    import ray

    config = config_from(args)
    num_gpus = args.get("num_gpus")
    if num_gpus is None:
        num_gpus = 1 if ray.is_initialized() and ray.cluster_resources().get("GPU", 0) >= 1 else 0
    scaling: dict = {"num_replicas": int(args.get("replicas", 1))}
    if args.get("min_replicas") is not None or args.get("max_replicas") is not None:
        scaling = {"autoscaling_config": {
            "min_replicas": int(args.get("min_replicas", 1)),
            "max_replicas": int(args.get("max_replicas", args.get("min_replicas", 1))),
            "target_ongoing_requests": max(1, config.max_batch_size // 2)}}
    per_replica = int(args.get("adapters_per_replica", 128))
    # Under its own name: Serve finds `self` by looking the wrapped function up on it by name.
    engine_class = type("Engine", (Engine,), {
        "load": serve.multiplexed(max_num_models_per_replica=per_replica)(Engine.load)})
    # Serve's default of 5 ongoing requests would spill an adapter's traffic onto other replicas
    # long before its batch is full: a replica takes what its engine batches, and queues the rest.
    engine = serve.deployment(
        engine_class, name="Engine", **scaling,
        max_ongoing_requests=config.max_batch_size + config.max_waiting,
        ray_actor_options={"num_gpus": num_gpus, "num_cpus": float(args.get("num_cpus", 1)),
                           "runtime_env": {"env_vars": openmp.environment()}},  # set before the replica loads torch
        health_check_period_s=5, graceful_shutdown_timeout_s=config.shutdown_timeout)
    ingress = serve.deployment(Ingress, name="Ingress",
                               max_ongoing_requests=10 * (config.max_batch_size + config.max_waiting),
                               ray_actor_options={"num_cpus": 0, "runtime_env": {"env_vars": ROUTER_ENV}})
    return ingress.bind(engine.bind(config))


def app(args: dict):
    """`serve run server.ray_serve:app key=value ...`: the application builder."""
    return deployment(args)
