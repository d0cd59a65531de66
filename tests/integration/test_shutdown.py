"""SIGTERM drains: new requests are turned away, running ones finish, and the process exits 0."""

from __future__ import annotations

import json
import threading
import time

import httpx

from .conftest import PROMPT
from .support import generate_body, metric, scrape, token_ids

N = 300  # long enough to be still running while the test checks that new requests are refused


def refused(url: str, route: str) -> str:
    """'503' (draining) or 'closed' (no longer listening); anything else fails."""
    try:
        if route == "/health":
            r = httpx.get(url + route, timeout=10)
        else:
            r = httpx.post(url + route, json=generate_body(PROMPT, None, 2), timeout=10)
    except httpx.TransportError:
        return "closed"
    assert r.status_code == 503, f"{route} while draining: {r.status_code} {r.text}"
    if route != "/health":
        assert int(r.headers["retry-after"]) >= 1
        error = r.json()["error"]  # OpenAI's shape on /v1/*, TGI's elsewhere
        assert (error["code"] if route.startswith("/v1/") else r.json()["error_type"]) == "overloaded"
    return "503"


def wait_draining(url: str, within: float = 5) -> None:
    """The signal is handled asynchronously: wait until /health says the server drains (or is gone)."""
    deadline = time.monotonic() + within
    while True:
        try:
            if httpx.get(url + "/health", timeout=10).status_code == 503:
                return
        except httpx.TransportError:
            return
        assert time.monotonic() < deadline, "SIGTERM not acted on"
        time.sleep(0.005)


def wait_running(client: httpx.Client, n: int, within: float = 30) -> None:
    deadline = time.monotonic() + within
    while metric(scrape(client), "softprompt_running_requests") < n:
        assert time.monotonic() < deadline, f"fewer than {n} requests running after {within}s"
        time.sleep(0.02)


def test_sigterm_drains_in_flight_requests(start_server, reference):
    expected = reference(None, PROMPT, N)
    assert len(expected) == N, "the base model ends this prompt early; pick another"
    server = start_server("--shutdown-timeout", "300", name="shutdown")  # a slow, busy machine must not abort
    results: dict[str, object] = {}

    def plain():
        with httpx.Client(base_url=server.url, timeout=120) as c:
            results["plain"] = c.post("/generate", json=generate_body(PROMPT, None, N))

    def streamed():
        with httpx.Client(base_url=server.url, timeout=120) as c, \
                c.stream("POST", "/generate_stream", json=generate_body(PROMPT, None, N)) as r:
            results["stream_status"] = r.status_code
            results["events"] = [json.loads(line[5:]) for line in r.iter_lines() if line.startswith("data:")]

    threads = [threading.Thread(target=plain), threading.Thread(target=streamed)]
    for t in threads:
        t.start()
    with server.client() as c:
        wait_running(c, 2)
    t_term = time.monotonic()
    server.terminate()

    wait_draining(server.url)
    outcomes = [refused(server.url, route) for route in ("/generate", "/generate_stream", "/", "/v1/completions",
                                                         "/health")]
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "in-flight requests did not complete"
    code = server.wait(timeout=30)
    elapsed = time.monotonic() - t_term

    plain_r = results["plain"]
    assert plain_r.status_code == 200, f"{plain_r.text}\nserver log:\n{server.log_tail()}"
    assert token_ids(plain_r.json()) == expected
    assert plain_r.json()["details"]["finish_reason"] == "length"
    assert results["stream_status"] == 200
    events = results["events"]
    assert events and "error" not in events[-1], f"{events[-1:]}\nserver log:\n{server.log_tail()}"
    assert [e["token"]["id"] for e in events] == expected
    assert events[-1]["details"]["generated_tokens"] == N
    assert events[-1]["generated_text"] == plain_r.json()["generated_text"]
    assert "503" in outcomes, f"new requests were never refused while draining: {outcomes}"
    assert code == 0, f"exit code {code}; log:\n{server.log_tail()}"
    assert elapsed < 120


def test_shutdown_timeout_aborts_what_is_still_running(start_server):
    """Past --shutdown-timeout (0 here) the running requests are ended, and the server still exits 0."""
    server = start_server("--shutdown-timeout", "0", name="shutdown-timeout")
    results: dict[str, object] = {}

    def long_request():
        try:
            with httpx.Client(base_url=server.url, timeout=120) as c:
                results["r"] = c.post("/generate", json=generate_body("a", None, 1024))  # no EOS
        except httpx.TransportError as exc:
            results["r"] = exc

    t = threading.Thread(target=long_request)
    t.start()
    with server.client() as c:
        wait_running(c, 1)
    t0 = time.monotonic()
    server.terminate()
    code = server.wait(timeout=30)
    t.join(timeout=30)
    assert code == 0, server.log_tail()
    assert time.monotonic() - t0 < 15
    r = results["r"]
    if isinstance(r, httpx.Response):  # answered with an error rather than cut off
        assert r.status_code >= 500, r.text
