"""A client that goes away aborts its request: the engine stops generating for it at once."""

from __future__ import annotations

import json
import socket
import time
import urllib.parse

import httpx
import pytest

from .conftest import PROMPT
from .support import generate, generate_body, metric, scrape

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