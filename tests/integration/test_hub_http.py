"""`parameters.adapter_source: "hub"`: an adapter fetched from the Hugging Face hub on first use.

No machine here reaches the hub, so the server reads an offline hub cache (HF_HUB_OFFLINE=1)
that the test lays out as `huggingface_hub` writes it: `models--org--name/blobs/<hash>`,
`snapshots/<commit>/<file>` (links to the blobs) and `refs/<branch or tag>` (a commit hash). The
real `hf_hub_download` reads it; nothing is mocked. Where the hub must answer (sizes asked before
a download), `FakeHub` answers on loopback as the hub's file endpoints do, and counts the requests.

Fetching needs the admin key or the repo in --allow-hub-adapters: the servers here allow `acme/*`.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from .conftest import PROMPT, running_server
from .support import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    adapter_names,
    assert_error,
    free_port,
    generate,
    generate_body,
    leftovers,
    metric,
    scrape,
    stored,
    token_ids,
    upload,
)

MAX_NEW = 10  # as test_adapters_http: the session caches PEFT's reference per (adapter, prompt, length)
REPO = "acme/pirate-prompt"
MAIN, TAGGED = "a" * 40, "b" * 40  # commits: main holds the prompt-tuning adapter, tag v1 the prefix one
ALLOW = ("--allow-hub-adapters", "acme/*")
SMALL_CAP = 8192  # --max-upload-bytes where a test needs an adapter over it (the prompt adapter's files: 2-3 KB)


def cache_repo(cache: Path, repo_id: str, commits: dict[str, dict[str, bytes]], refs: dict[str, str]) -> None:
    """A repo in a hub cache: commit -> {file: bytes}, ref -> commit."""
    root = cache / ("models--" + repo_id.replace("/", "--"))
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    for commit, files in commits.items():
        snapshot = root / "snapshots" / commit
        snapshot.mkdir(parents=True, exist_ok=True)
        for filename, data in files.items():
            blob = hashlib.sha256(data).hexdigest()
            (root / "blobs" / blob).write_bytes(data)
            os.symlink(Path("..", "..", "blobs", blob), snapshot / filename)
    (root / "refs").mkdir(exist_ok=True)
    for ref, commit in refs.items():
        (root / "refs" / ref).write_text(commit)  # no newline, as huggingface_hub writes it


def _files(src: Path) -> dict[str, bytes]:
    return {f: (src / f).read_bytes() for f in (CONFIG_FILE, WEIGHTS_FILE)}


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory, adapter_srcs) -> Path:
    cache = tmp_path_factory.mktemp("hf-home") / "hub"
    cache_repo(cache, REPO, {MAIN: _files(adapter_srcs["prompt"]), TAGGED: _files(adapter_srcs["prefix"])},
               {"main": MAIN, "v1": TAGGED})
    config_only = {CONFIG_FILE: (adapter_srcs["prompt"] / CONFIG_FILE).read_bytes(), "adapter_model.bin": b"pickle"}
    cache_repo(cache, "acme/pickled", {MAIN: config_only}, {"main": MAIN})
    wrong = {CONFIG_FILE: (adapter_srcs["prompt"] / CONFIG_FILE).read_bytes(), WEIGHTS_FILE: b"\x08" + b"\x00" * 7}
    cache_repo(cache, "acme/broken", {MAIN: wrong}, {"main": MAIN})
    cache_repo(cache, "other/pirate-prompt", {MAIN: _files(adapter_srcs["prompt"])}, {"main": MAIN})
    huge = {CONFIG_FILE: (adapter_srcs["prompt"] / CONFIG_FILE).read_bytes(), WEIGHTS_FILE: b"\x00" * (SMALL_CAP + 1)}
    cache_repo(cache, "acme/huge", {MAIN: huge}, {"main": MAIN})
    return cache


@pytest.fixture(scope="module")
def hub_server(model_dir, hub_cache, tmp_path_factory):
    root = tmp_path_factory.mktemp("hub-server")
    env = {"HF_HOME": str(hub_cache.parent), "HF_HUB_CACHE": str(hub_cache), "HF_HUB_OFFLINE": "1"}
    with running_server(model_dir, root / "store", root, *ALLOW, name="hub", env=env) as server:
        yield server


@pytest.fixture
def hub_client(hub_server):
    with hub_server.client() as c:
        yield c


def test_hub_adapter_generates_as_the_same_adapter_uploaded(hub_client, hub_server, adapter_srcs, reference):
    c = hub_client
    loads = metric(scrape(c), "softprompt_adapter_loads_total")

    async def many():  # concurrent first requests: one fetch
        async with httpx.AsyncClient(base_url=hub_server.url, timeout=60) as ac:
            return await asyncio.gather(*(ac.post("/generate", json=generate_body(PROMPT, REPO, MAX_NEW,
                                                                                   adapter_source="hub"))
                                          for _ in range(4)))

    responses = asyncio.run(many())
    for r in responses:
        assert r.status_code == 200, r.text
    from_hub = token_ids(responses[0].json())
    assert all(token_ids(r.json()) == from_hub for r in responses)
    assert metric(scrape(c), "softprompt_adapter_loads_total") == loads + 1

    assert upload(c, "local-copy", adapter_srcs["prompt"]).status_code == 201
    assert token_ids(generate(c, PROMPT, "local-copy", MAX_NEW)) == from_hub == reference("prompt", PROMPT, MAX_NEW)
    assert from_hub != token_ids(generate(c, PROMPT, None, MAX_NEW))

    # registered and stored under its mapped name; served again without a fetch, from either spelling
    desc = c.get("/adapters/acme--pirate-prompt").json()
    assert desc["source"] == "hub" and desc["peft_type"] == "PROMPT_TUNING"
    store = hub_server.adapter_dir / "acme--pirate-prompt"
    assert (store / WEIGHTS_FILE).read_bytes() == (adapter_srcs["prompt"] / WEIGHTS_FILE).read_bytes()
    assert token_ids(generate(c, PROMPT, REPO, MAX_NEW, adapter_source="hub")) == from_hub
    assert token_ids(generate(c, PROMPT, "acme--pirate-prompt", MAX_NEW)) == from_hub
    assert metric(scrape(c), "softprompt_adapter_loads_total") == loads + 2  # + local-copy
    # the local source (the default) never fetches: the repo id is no registered name
    assert_error(c.post("/generate", json=generate_body(PROMPT, REPO, MAX_NEW)), 404, REPO)


def test_revision_pins(hub_client, reference):
    c = hub_client
    tagged = token_ids(generate(c, PROMPT, f"{REPO}@v1", MAX_NEW, adapter_source="hub"))
    assert tagged == reference("prefix", PROMPT, MAX_NEW)
    by_commit = token_ids(generate(c, PROMPT, f"{REPO}@{MAIN}", MAX_NEW, adapter_source="hub"))
    assert by_commit == reference("prompt", PROMPT, MAX_NEW)
    names = adapter_names(c)
    assert "acme--pirate-prompt..v1" in names and f"acme--pirate-prompt..{MAIN}" in names


def test_missing_or_invalid_hub_adapters_are_4xx_naming_the_hub(hub_client, hub_server):
    c = hub_client
    before = adapter_names(c)
    for adapter_id in ("acme/missing", f"{REPO}@v9", "acme/pickled"):
        r = c.post("/generate", json=generate_body(PROMPT, adapter_id, 2, adapter_source="hub"))
        assert_error(r, 404, "Hugging Face hub", adapter_id.split("@")[0])
    r = c.post("/generate", json=generate_body(PROMPT, "acme/broken", 2, adapter_source="hub"))
    assert_error(r, 422, "acme/broken", WEIGHTS_FILE)
    for bad_id in ("acme/two/slashes", "acme/bad--name", f"{REPO}@"):
        r = c.post("/generate", json=generate_body(PROMPT, bad_id, 2, adapter_source="hub"))
        assert_error(r, 422, "hub", bad_id)
    r = c.post("/generate_stream", json=generate_body(PROMPT, "acme/missing", 2, adapter_source="hub"))
    assert_error(r, 404, "Hugging Face hub")
    assert adapter_names(c) == before
    assert stored(hub_server.adapter_dir) == before, "a refused fetch left files in the store"
    assert leftovers(hub_server.adapter_dir) == []


def test_unreachable_hub_is_502_naming_it(model_dir, hub_cache, tmp_path, reference):
    """Online, with a hub that refuses connections: cached files still serve, others get a quick 502."""
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    env = {"HF_HOME": str(hub_cache.parent), "HF_HUB_CACHE": str(hub_cache), "HF_ENDPOINT": dead,
           "HF_HUB_OFFLINE": "0"}
    with running_server(model_dir, tmp_path / "store", tmp_path, *ALLOW, "--max-upload-bytes", SMALL_CAP,
                        name="hub-down", env=env) as server, server.client(timeout=30) as c:
        r = c.post("/generate", json=generate_body(PROMPT, "acme/elsewhere", 2, adapter_source="hub"))
        assert_error(r, 502, "Hugging Face hub", dead, "acme/elsewhere")
        assert r.elapsed.total_seconds() < 10
        pinned = generate(c, PROMPT, f"{REPO}@{MAIN}", MAX_NEW, adapter_source="hub")
        assert token_ids(pinned) == reference("prompt", PROMPT, MAX_NEW)
        # from the cache too, an adapter over --max-upload-bytes is refused before it is read
        r = c.post("/generate", json=generate_body(PROMPT, "acme/huge", 2, adapter_source="hub"))
        assert_error(r, 413, "acme/huge", "--max-upload-bytes")
        assert stored(server.adapter_dir) == [f"acme--pirate-prompt..{MAIN}"]



def test_a_repo_not_allowed_is_403_naming_the_flag(hub_client, hub_server):
    """This server has no admin key: only the repos in --allow-hub-adapters (acme/*) are fetched."""
    c = hub_client
    before = adapter_names(c)
    for route in ("/generate", "/generate_stream"):
        r = c.post(route, json=generate_body(PROMPT, "other/pirate-prompt", 2, adapter_source="hub"))
        assert_error(r, 403, "other/pirate-prompt", "--allow-hub-adapters")
    assert adapter_names(c) == before and stored(hub_server.adapter_dir) == before
    assert leftovers(hub_server.adapter_dir) == []


# ---- a hub that answers ----------------------------------------------------------------------------------

class FakeHub(ThreadingHTTPServer):
    """The hub's file endpoints (`/{repo}/resolve/{revision}/{file}`, HEAD and GET) over `repos`
    (repo id -> {file: bytes}, at one commit), recording each request as (method, repo, file)."""

    COMMIT = "c" * 40

    def __init__(self, repos: dict[str, dict[str, bytes]]):
        super().__init__(("127.0.0.1", 0), _FakeHubHandler)
        self.repos = repos
        self.requests: list[tuple[str, str, str]] = []
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def fetched(self, repo: str, filename: str) -> bool:
        """Whether any byte of the file was asked for (a GET)."""
        return ("GET", repo, filename) in self.requests


class _FakeHubHandler(BaseHTTPRequestHandler):
    server: FakeHub

    def do_HEAD(self):  # noqa: N802 - http.server's names
        self._answer(body=False)

    def do_GET(self):  # noqa: N802
        self._answer(body=True)

    def _answer(self, body: bool) -> None:
        parts = self.path.split("?")[0].strip("/").split("/")
        if len(parts) < 5 or parts[2] != "resolve":
            return self._error(404, "RepoNotFound")
        repo, filename = "/".join(parts[:2]), "/".join(parts[4:])
        self.server.requests.append(("GET" if body else "HEAD", repo, filename))
        if repo not in self.server.repos:
            return self._error(404, "RepoNotFound")
        data = self.server.repos[repo].get(filename)
        if data is None:
            return self._error(404, "EntryNotFound")
        self.send_response(200)
        self.send_header("X-Repo-Commit", FakeHub.COMMIT)
        self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)

    def _error(self, status: int, code: str) -> None:
        self.send_response(status)
        self.send_header("X-Error-Code", code)
        self.send_header("X-Repo-Commit", FakeHub.COMMIT)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


def test_hub_fetches_need_the_admin_key_or_the_allow_list_and_sizes_come_first(model_dir, adapter_srcs, tmp_path,
                                                                               reference):
    prompt = _files(adapter_srcs["prompt"])
    hub = FakeHub({"acme/allowed-prompt": prompt, "other/prompt": prompt,
                   "acme/allowed-huge": {CONFIG_FILE: prompt[CONFIG_FILE], WEIGHTS_FILE: b"\x00" * SMALL_CAP}})
    hub.thread.start()
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": str(tmp_path / "hf" / "hub"), "HF_ENDPOINT": hub.url,
           "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_XET": "1"}
    flags = ("--api-key", "gen", "--admin-key", "adm", "--allow-hub-adapters", "solo/exact, acme/allowed-*",
             "--max-upload-bytes", SMALL_CAP)
    try:
        with running_server(model_dir, tmp_path / "store", tmp_path, *flags, name="hub-fake", env=env) as server, \
                server.client(timeout=30) as c:
            user, admin = {"Authorization": "Bearer gen"}, {"Authorization": "Bearer adm"}

            def ask(adapter_id, headers):
                return c.post("/generate", json=generate_body(PROMPT, adapter_id, MAX_NEW, adapter_source="hub"),
                              headers=headers)

            r = ask("other/prompt", user)  # neither allowed nor the admin's
            assert_error(r, 403, "other/prompt", "--allow-hub-adapters", "admin key")
            assert not [q for q in hub.requests if q[1] == "other/prompt"], "the hub was asked for a refused repo"

            r = ask("acme/allowed-prompt", user)  # allowed by a pattern: any client with the generation key
            assert r.status_code == 200, r.text
            assert token_ids(r.json()) == reference("prompt", PROMPT, MAX_NEW)
            assert hub.fetched("acme/allowed-prompt", WEIGHTS_FILE)

            r = ask("other/prompt", admin)  # the admin key fetches any repo (and grants generation)
            assert r.status_code == 200, r.text
            assert token_ids(r.json()) == reference("prompt", PROMPT, MAX_NEW)
            r = ask("other/prompt", user)  # fetched and stored once: served to anyone after
            assert r.status_code == 200, r.text

            r = ask("acme/allowed-huge", admin)  # over --max-upload-bytes: refused from the sizes alone
            assert_error(r, 413, "acme/allowed-huge", "--max-upload-bytes", str(SMALL_CAP))
            assert ("HEAD", "acme/allowed-huge", WEIGHTS_FILE) in hub.requests
            assert not hub.fetched("acme/allowed-huge", WEIGHTS_FILE), "a byte of the weights was downloaded"
            assert not hub.fetched("acme/allowed-huge", CONFIG_FILE)

            assert stored(server.adapter_dir) == ["acme--allowed-prompt", "other--prompt"]
            assert leftovers(server.adapter_dir) == []
            assert_error(ask("acme/allowed-prompt", {}), 401)
    finally:
        hub.shutdown()
        hub.server_close()
