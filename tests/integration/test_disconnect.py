"""A client that goes away aborts its request: the engine stops generating for it at once."""

from __future__ import annotations

import json
import socket
import time
import urllib.parse

import httpx
import pytest

from .conftest import PROMPT
from .support import generate, generate_body, metric, scrape, sse_events

LONG = 1024  # the server's default --max-new-tokens
LONG_PROMPT = "a"  # the base model runs 614 tokens on it before EOS (PROMPT reaches it sooner)


def wait_idle(client: httpx.Client, within: float) -> float:
    """Seconds until the engine has no running or waiting request; fails after `within`."""
    t0 = time.monotonic()
    while True:
        samples = scrape(client)
        if metric(samples, "softprompt_running_requests") == 0 and metric(samples, "softprompt_queue_depth") == 0:
            return time.monotonic() - t0
        assert time.monotonic() - t0 < within, f"request still running {within}s after the client left"
        time.sleep(0.05)


def assert_memory_freed(client: httpx.Client) -> None:
    """The aborted request's key/value segment is back in the pool."""
    deadline = time.monotonic() + 2
    while metric(scrape(client), "softprompt_kv_cache_slots_held") != 0:
        assert time.monotonic() < deadline, "the aborted request still holds key/value memory"
        time.sleep(0.02)
    assert metric(scrape(client), "softprompt_kv_cache_usage") == 0


def tokens(samples) -> float:
    return metric(samples, "softprompt_generated_tokens_total", default=0.0)


@pytest.fixture
def idle_server(server, client):
    wait_idle(client, 90)  # nothing left over from earlier tests
    return server


def read_then_leave(server, path: str, body: dict, client: httpx.Client, events: int = 2) -> None:
    """Read `events` SSE events, check the request is running, then close the connection mid-stream."""
    with httpx.Client(base_url=server.url, timeout=60) as c, c.stream("POST", path, json=body) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        seen = []
        while len(seen) < events:
            line = next(lines)
            if line.startswith("data:"):
                seen.append(line)
        # checked before leaving the loop: abandoning the line iterator closes the response
        running = metric(scrape(client), "softprompt_running_requests")
        assert running == 1, f"events: {seen}\nserver log:\n{server.log_tail()}"
        lines.close()


def test_stream_disconnect_aborts_the_request(idle_server, client):
    before = scrape(client)
    read_then_leave(idle_server, "/generate_stream", generate_body(LONG_PROMPT, None, LONG), client)
    wait_idle(client, within=5)
    after = scrape(client)
    # it was aborted, not finished: a finished request would have added its tokens
    assert tokens(after) == tokens(before)
    assert_memory_freed(client)
    assert generate(client, PROMPT, max_new_tokens=3)["details"]["generated_tokens"] == 3


def test_openai_stream_disconnect_aborts_the_request(idle_server, client):
    before = scrape(client)
    body = {"prompt": LONG_PROMPT, "max_tokens": LONG, "temperature": 0, "stream": True}
    read_then_leave(idle_server, "/v1/completions", body, client)
    wait_idle(client, within=5)
    after = scrape(client)
    assert tokens(after) == tokens(before)


def test_generate_disconnect_aborts_the_request(start_server):
    """The same for a non-streaming /generate whose client closes the connection while it runs.

    On a server of its own: if the abort does not happen, the runaway request slows no other test.
    The client leaves once the request is seen running, not after a fixed time: the test model
    reaches EOS after 614 tokens, which a fast moment of a 2-core machine generates in under 0.5 s.
    """
    server = start_server("--shutdown-timeout", "0", name="disconnect")
    with server.client() as client:
        before = scrape(client)
        body = json.dumps(generate_body(LONG_PROMPT, None, LONG)).encode()
        url = urllib.parse.urlsplit(server.url)
        with socket.create_connection((url.hostname, url.port)) as sock:
            sock.sendall(b"POST /generate HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            deadline = time.monotonic() + 10
            while metric(scrape(client), "softprompt_running_requests") != 1:
                assert time.monotonic() < deadline, f"the request never ran\n{server.log_tail()}"
                time.sleep(0.002)
        wait_idle(client, within=5)
        after = scrape(client)
        assert tokens(after) == tokens(before), server.log_tail()  # aborted: a finished one adds its tokens
        assert generate(client, PROMPT, max_new_tokens=3)["details"]["generated_tokens"] == 3

def _read_chunked_events(sock: socket.socket) -> tuple[list[str], int]:
    """Every SSE data field of a chunked HTTP response, read to its end, and the bytes read."""
    raw = b""
    while not raw.endswith(b"0\r\n\r\n"):
        data = sock.recv(65536)
        assert data, "the server closed the stream before its end"
        raw += data
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    payload = b""
    while True:
        size_line, _, body = body.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            break
        payload, body = payload + body[:size], body[size + 2:]
    return [line[6:] for line in payload.decode().split("\n") if line.startswith("data: ")], len(raw)


def test_a_client_that_stops_reading_holds_up_no_other_stream(idle_server, client):
    """A streaming client that stops reading fills its socket, so the server's writes to it wait
    (flow control) and its later chunks queue behind them: streams written in the same steps go
    on meanwhile, and once it reads again it gets every chunk, in order."""
    choices = 40  # of 1024 tokens each: about 6.7 MB, more than the socket buffers (4 MiB at most here) and uvicorn
    body = {"prompt": [LONG_PROMPT] * choices, "max_tokens": LONG, "temperature": 0, "stream": True,
            "ignore_eos": True}
    payload = json.dumps(body).encode()
    url = urllib.parse.urlsplit(idle_server.url)
    with socket.socket() as slow:
        slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window: the server's buffers fill
        slow.connect((url.hostname, url.port))
        slow.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload))
        deadline = time.monotonic() + 10
        while metric(scrape(client), "softprompt_running_requests") != choices:
            assert time.monotonic() < deadline, f"the request never ran\n{idle_server.log_tail()}"
            time.sleep(0.01)
        # another stream, beside it in every step, while nobody reads the first
        other = dict(body, prompt=LONG_PROMPT, max_tokens=64)
        with client.stream("POST", "/v1/completions", json=other, timeout=30) as r:
            events = sse_events(r.iter_lines())
        assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] == "length"
        assert metric(scrape(client), "softprompt_running_requests") == choices  # the slow ones still run
        wait_idle(client, within=120)  # they generated everything, into their response's queue
        events, size = _read_chunked_events(slow)
    assert events[-1] == "[DONE]" and size > 6_000_000
    texts, finished = [""] * choices, [None] * choices
    for event in events[:-1]:
        choice = json.loads(event)["choices"][0]
        texts[choice["index"]] += choice["text"]
        finished[choice["index"]] = choice["finish_reason"]
    expected = client.post("/v1/completions", json=dict(body, stream=False), timeout=120).json()["choices"]
    assert texts == [c["text"] for c in expected] and finished == ["length"] * choices
