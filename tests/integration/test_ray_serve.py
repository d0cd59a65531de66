"""The application of server/ray_serve.py on a local Ray instance: 2 CPU engine replicas of the tiny
llama behind the ingress, one shared store directory. Uploads through the application, 200
requests over TGI's and OpenAI's routes (streaming and not) with the single server's answers,
adapter affinity, a delete honoured by both replicas within 2 s, and a replica killed."""

from __future__ import annotations

import asyncio
import collections
import json
import time

import httpx
import pytest

from .conftest import PROMPT
from .support import free_port, generate_body, sse_events, token_ids, upload

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

KINDS = ["prompt", "ptuning-mlp", "ptuning-lstm", "prefix", "prefix-proj"]
NAMES = {f"ray-{kind}-{i}": kind for i in range(2) for kind in KINDS}  # 10 adapters, every kind twice
MAX_NEW = 8
APP = "softprompt"


@pytest.fixture(scope="module")
def ray_app(model_dir, tmp_path_factory):
    from server.engine.cpu import kernels as cpu_kernels
    from server.ray_serve import app

    cpu_kernels.available()  # built here if the sources changed: the replicas then load it from the cache
    store = tmp_path_factory.mktemp("ray-store")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        began = time.monotonic()
        serve.run(app({"model": str(model_dir), "adapter_store": str(store), "replicas": 2, "device": "cpu",
                       "dtype": "float32", "kv_cache_memory": "64MiB", "cpu_threads": 1, "max_batch_size": 16}),
                  name=APP, route_prefix="/")
        print(f"Ray Serve application up in {time.monotonic() - began:.1f} s")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def client(ray_app):
    with httpx.Client(base_url=ray_app, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def uploaded(client, adapter_srcs):
    for name, kind in NAMES.items():
        r = upload(client, name, adapter_srcs[kind])
        assert r.status_code == 201, r.text
        assert r.headers["x-replica"]
    return NAMES


@pytest.fixture(scope="module")
def single_texts(server, adapter_srcs, uploaded):
    """What the single server's OpenAI route answers for each kind (the `server` fixture)."""
    texts = {}
    with server.client() as c:
        for kind in KINDS:
            name = f"single-{kind}"
            assert upload(c, name, adapter_srcs[kind]).status_code in (201, 409)
            r = c.post("/v1/completions", json={"model": name, "prompt": PROMPT, "max_tokens": MAX_NEW,
                                                "temperature": 0})
            assert r.status_code == 200, r.text
            texts[kind] = r.json()["choices"][0]["text"]
    return texts


def test_health_info_and_listing(client, uploaded):
    r = client.get("/health")
    assert r.status_code == 200 and r.headers["x-replica"]
    assert client.get("/info").json()["model_dtype"] == "float32"
    listed = client.get("/adapters", params={"limit": 100}).json()["adapters"]
    assert {a["name"] for a in listed} >= set(NAMES)
    assert client.get("/metrics").status_code == 200


async def _one(client: httpx.AsyncClient, i: int, name: str) -> tuple[str, str, str, object]:
    """Request `i` of the mix: TGI or OpenAI, streaming or not. Returns (route, name, replica, answer)."""
    route = ["generate", "generate_stream", "completions", "completions_stream"][i % 4]
    if route.startswith("generate"):
        r = await client.post(f"/{route}", json=generate_body(PROMPT, name, MAX_NEW))
        assert r.status_code == 200, r.text
        answer = (token_ids(r.json()) if route == "generate"
                  else [e["token"]["id"] for e in sse_events(r.text.splitlines())])
    else:
        body = {"model": name, "prompt": PROMPT, "max_tokens": MAX_NEW, "temperature": 0,
                "stream": route.endswith("stream")}
        r = await client.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        if body["stream"]:
            events = [line[5:].strip() for line in r.text.splitlines() if line.startswith("data:")]
            answer = "".join(json.loads(e)["choices"][0]["text"] for e in events if e != "[DONE]")
        else:
            answer = r.json()["choices"][0]["text"]
    return route, name, r.headers["x-replica"], answer


async def _many(url: str, names: list[str], concurrency: int = 16):
    limit = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        async def bounded(i, name):
            async with limit:
                return await _one(client, i, name)

        return await asyncio.gather(*(bounded(i, n) for i, n in enumerate(names)))


def test_200_requests_answer_as_the_single_server_with_affinity(ray_app, client, uploaded, reference, single_texts):
    first = {}
    for name in uploaded:  # each adapter loaded by one replica first
        r = client.post("/generate", json=generate_body(PROMPT, name, MAX_NEW))
        assert r.status_code == 200, r.text
        first[name] = r.headers["x-replica"]
    time.sleep(1.5)  # the replicas' loaded adapters reach Serve's routers
    names = [list(uploaded)[i % len(uploaded)] for i in range(200)]
    began = time.monotonic()
    results = asyncio.run(_many(ray_app, names))
    print(f"200 requests in {time.monotonic() - began:.1f} s")
    on_first = collections.Counter()
    replicas = set()
    for route, name, replica, answer in results:
        kind = uploaded[name]
        if route.startswith("generate"):
            assert answer == reference(kind, PROMPT, MAX_NEW), (route, name)
        else:
            assert answer == single_texts[kind], (route, name)
        replicas.add(replica)
        on_first[replica == first[name]] += 1
    assert len(set(first.values()) | replicas) == 2, "both replicas served"
    assert on_first[True] >= 0.8 * len(results), f"adapter affinity: {on_first}"


def _burst(url: str, name: str, n: int = 12) -> list[tuple[int, str]]:
    async def run():
        async with httpx.AsyncClient(base_url=url, timeout=60) as c:
            rs = await asyncio.gather(*(c.post("/generate", json=generate_body(PROMPT, name, 2)) for _ in range(n)))
            return [(r.status_code, r.headers.get("x-replica", "")) for r in rs]

    return asyncio.run(run())


def test_a_delete_is_honoured_by_both_replicas_within_2s(ray_app, client, adapter_srcs):
    served_by: set[str] = set()
    for attempt in range(10):  # bursts right after the upload reach both replicas before Serve knows who has it
        # a new name each time: Serve remembers which replica loaded a name, and routes it there from then on
        name = f"ray-deleted-{attempt}"
        assert upload(client, name, adapter_srcs["prefix"]).status_code == 201
        outcomes = _burst(ray_app, name, 16)
        assert all(status == 200 for status, _ in outcomes), outcomes
        served_by = {replica for _, replica in outcomes}
        if len(served_by) == 2:
            break
        assert client.delete(f"/adapters/{name}").status_code == 204
    assert len(served_by) == 2, "could not get the adapter loaded on both replicas"
    assert client.delete(f"/adapters/{name}").status_code == 204
    deadline = time.monotonic() + 2.0
    while True:
        outcomes = _burst(ray_app, name, 8)
        if all(status == 404 for status, _ in outcomes):
            break
        assert time.monotonic() < deadline, f"still served 2 s after the delete: {outcomes}"
        time.sleep(0.1)
    after = time.monotonic() - (deadline - 2.0)
    print(f"delete honoured everywhere {after:.2f} s after it")


def test_a_killed_replica_gives_clean_503s_and_the_others_serve(ray_app, client, uploaded):
    replicas = [a for a in ray.util.list_named_actors(all_namespaces=True)
                if "SERVE_REPLICA" in a["name"] and "Engine" in a["name"]]
    assert len(replicas) == 2, replicas
    victim = ray.get_actor(replicas[0]["name"], namespace=replicas[0]["namespace"])
    names = [list(uploaded)[i % len(uploaded)] for i in range(24)]

    async def stream(c, route: str, body: dict) -> list:
        async with c.stream("POST", route, json=body) as r:
            assert r.status_code in (200, 503)
            return sse_events([line async for line in r.aiter_lines()]) if r.status_code == 200 else [r.status_code]

    async def during():
        async with httpx.AsyncClient(base_url=ray_app, timeout=60) as c:
            pending = [asyncio.ensure_future(c.post("/generate", json=generate_body(PROMPT, n, 64)))
                       for n in names]
            streams = [asyncio.ensure_future(stream(c, "/generate_stream", generate_body(PROMPT, n, 200)))
                       for n in names[:6]]
            streams += [asyncio.ensure_future(stream(c, "/v1/completions", {
                "model": n, "prompt": PROMPT, "max_tokens": 200, "stream": True})) for n in names[6:12]]
            await asyncio.sleep(1.0)
            ray.kill(victim)
            return await asyncio.gather(*pending), await asyncio.gather(*streams)

    answers, streams = asyncio.run(during())
    for r in answers:
        assert r.status_code in (200, 503), r.text
        if r.status_code == 503:
            assert r.json()["error_type"] == "unavailable" and r.headers["x-replica"]
    cut = 0
    for i, events in enumerate(streams):  # every stream ends: its last token, or an error event; never cut short
        if events == [503]:
            continue
        openai_route = i >= 6
        last = events[-2] if openai_route else events[-1]
        if openai_route:
            assert events[-1] == "[DONE]", events[-3:]
        if "error" in last:
            cut += 1
            assert (last["error"]["code"] if openai_route else last["error_type"]) == "unavailable", last
        else:
            assert (last["choices"][0]["finish_reason"] if openai_route else last["details"]["finish_reason"]), last
    print(f"{cut} of {len(streams)} streams ended by the killed replica's error event")
    deadline = time.monotonic() + 30
    while True:  # Serve's routers drop the dead replica
        outcomes = [(r.status_code, r.text) for r in
                    [client.post("/generate", json=generate_body(PROMPT, n, 2)) for n in names[:10]]]
        if all(status == 200 for status, _ in outcomes):
            break
        assert all(status in (200, 503) for status, _ in outcomes), outcomes
        assert time.monotonic() < deadline, outcomes
        time.sleep(0.5)
    assert client.get("/health").status_code == 200
