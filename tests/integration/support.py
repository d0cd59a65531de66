"""Helpers for the integration tests: a real `python -m server` process on loopback, and the HTTP
calls, SSE and Prometheus parsing the tests share."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from adapters.prefix_file import PREFIX_FILE

REPO = Path(__file__).resolve().parents[2]
STARTUP_TIMEOUT = 90.0
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """One server process: `start()` waits for GET /health == 200, `stop()` sends SIGTERM."""

    def __init__(self, model_dir: Path, adapter_dir: Path, log_dir: Path, *extra: str, name: str = "server",
                 env: dict[str, str] | None = None):
        """env: variables set for the process, over this one's (less its SOFTPROMPT_* ones)."""
        self.model_dir = Path(model_dir)
        self.adapter_dir = Path(adapter_dir)
        self.extra = [str(a) for a in extra]
        self.env = dict(env or {})
        self.log_path = Path(log_dir) / f"{name}-{time.monotonic_ns()}.log"
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def model_name(self) -> str:
        """What clients call the base model: the --model value, as given."""
        return str(self.model_dir)

    def start(self, timeout: float = STARTUP_TIMEOUT) -> ServerProcess:
        for attempt in range(3):  # a port picked free can be taken before the server binds it
            self._spawn()
            if self._wait_healthy(timeout):
                return self
            code = self.proc.poll()
            if code is None:
                self.kill()
                raise AssertionError(f"server not healthy within {timeout}s; log:\n{self.log_tail()}")
            if "address already in use" not in self.log_tail().lower() or attempt == 2:
                raise AssertionError(f"server exited with {code} before it was healthy; log:\n{self.log_tail()}")
        raise AssertionError("unreachable")

    def _spawn(self) -> None:
        self.port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("SOFTPROMPT_")}
        env["PYTHONUNBUFFERED"] = "1"
        env.update(self.env)
        # float32 unless a test asks otherwise: the token checks compare with PEFT in float32, and
        # `--dtype auto` picks bfloat16 on CPUs with AVX512-BF16 or AMX
        dtype = [] if "--dtype" in self.extra else ["--dtype", "float32"]
        cmd = [sys.executable, "-m", "server", "--model", str(self.model_dir), "--adapter-dir", str(self.adapter_dir),
               "--port", str(self.port), "--host", "127.0.0.1", "--log-level", "info", *dtype, *self.extra]
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)

    def _wait_healthy(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return True
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        return False

    def client(self, **kwargs) -> httpx.Client:
        kwargs.setdefault("timeout", 60)
        return httpx.Client(base_url=self.url, **kwargs)

    def terminate(self) -> None:
        """SIGTERM: the server drains and exits."""
        self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout=timeout)

    def stop(self, timeout: float = 30) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.terminate()
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self._log.close()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


# ---- requests -------------------------------------------------------------------------------------

def adapter_files(adapter_dir: Path) -> dict[str, bytes]:
    d = Path(adapter_dir)
    return {CONFIG_FILE: (d / CONFIG_FILE).read_bytes(), WEIGHTS_FILE: (d / WEIGHTS_FILE).read_bytes()}


def multipart(files: dict[str, bytes]) -> dict:
    """httpx `files=`: each part named by its file name, as PEFT's save_pretrained writes them."""
    return {key: (key, data, "application/octet-stream") for key, data in files.items()}


def upload(client: httpx.Client, name: str, files: dict[str, bytes] | Path, **kwargs) -> httpx.Response:
    if not isinstance(files, dict):
        files = adapter_files(files)
    return client.post("/adapters", data={"name": name}, files=multipart(files), **kwargs)


def generate_body(prompt: str, adapter: str | None = None, max_new_tokens: int = 8, **params) -> dict:
    parameters = {"max_new_tokens": max_new_tokens, "details": True, "do_sample": False, **params}
    if adapter is not None:
        parameters["adapter_id"] = adapter
    return {"inputs": prompt, "parameters": parameters}


def generate(client: httpx.Client, prompt: str, adapter: str | None = None, max_new_tokens: int = 8,
             **params) -> dict:
    """POST /generate, greedy with details; asserts 200 and returns the body."""
    r = client.post("/generate", json=generate_body(prompt, adapter, max_new_tokens, **params))
    assert r.status_code == 200, r.text
    return r.json()


def token_ids(body: dict) -> list[int]:
    return [t["id"] for t in body["details"]["tokens"]]


def sse_events(lines) -> list[dict]:
    """The JSON of each `data:` line of a text/event-stream; other non-blank lines are an error."""
    events = []
    for line in lines:
        if not line.strip():
            continue
        assert line.startswith("data:"), f"not an SSE data line: {line!r}"
        payload = line[5:].strip()
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def assert_error(r: httpx.Response, status: int, *mentions: str) -> dict:
    """The contract's error shape, the status, and a message naming each of `mentions`: on /v1/*
    OpenAI's `{"error": {"message", "type", "param", "code"}}` (returned as that inner object), else
    `{"error", "error_type"}`."""
    assert r.status_code == status, f"expected {status}, got {r.status_code}: {r.text}"
    body = r.json()
    if r.request.url.path.startswith("/v1/"):
        error = body.get("error")
        assert isinstance(error, dict) and set(error) == {"message", "type", "param", "code"}, body
        assert isinstance(error["message"], str) and error["message"] and isinstance(error["type"], str), body
        message = error["message"]
        body = error
    else:
        assert isinstance(body.get("error"), str) and body["error"], body
        assert isinstance(body.get("error_type"), str), body
        message = body["error"]
    for m in mentions:
        assert m in message, f"error message {message!r} does not name {m!r}"
    return body


def adapter_names(client: httpx.Client, **kwargs) -> list[str]:
    r = client.get("/adapters", **kwargs)
    assert r.status_code == 200, r.text
    return sorted(a["name"] for a in r.json()["adapters"])


def leftovers(store_dir: Path) -> list[str]:
    """Temporary or trashed entries a save, replace or delete left behind in the store (`.versions`,
    where the adapters' files are, is not one)."""
    return sorted(p.name for p in Path(store_dir).iterdir() if p.name.startswith(".") and p.name != ".versions")


def stored(store_dir: Path) -> list[str]:
    """The adapters in a local store: its entries not hidden (symlinks to a version, or plain directories)."""
    return sorted(p.name for p in Path(store_dir).iterdir() if not p.name.startswith("."))


def assert_unharmed(client: httpx.Client, store_dir: Path, expected: list[str], **kwargs) -> None:
    """After a refused request: same adapters, no half-written files, and the server still generates."""
    assert adapter_names(client, **kwargs) == sorted(expected)
    assert leftovers(store_dir) == []
    names = stored(store_dir)
    assert set(names) <= set(expected), f"store holds {names}, registry {expected}"
    for name in names:  # PEFT's two files, and the prefix materialized from them once used (a task's: its own)
        files = set(os.listdir(Path(store_dir) / name))
        assert {CONFIG_FILE, WEIGHTS_FILE} <= files, files
        assert all(f == PREFIX_FILE or re.fullmatch(r"prefix\.task\d+\.safetensors", f)
                   for f in files - {CONFIG_FILE, WEIGHTS_FILE}), files
    r = client.post("/generate", json=generate_body("ok", max_new_tokens=3), **kwargs)
    assert r.status_code == 200, r.text
    assert r.json()["details"]["generated_tokens"] == 3
    assert client.get("/health").status_code == 200


# ---- Prometheus text format ------------------------------------------------------------------------

_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (-?[0-9.eE+-]+|[+-]?Inf|NaN)$')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_metrics(text: str) -> tuple[dict[tuple, float], dict[str, str]]:
    """Samples {(name, ((label, value), ...)): value} and types {family: type}; asserts the format."""
    samples, types, helps = {}, {}, set()
    for line in text.splitlines():
        if not line:
            continue
        if line.startswith("# HELP "):
            helps.add(line.split()[2])
            continue
        if line.startswith("# TYPE "):
            _, _, family, kind = line.split(maxsplit=3)
            assert kind in ("counter", "gauge", "histogram", "summary", "untyped"), line
            types[family] = kind
            continue
        assert not line.startswith("#"), line
        m = _SAMPLE.match(line)
        assert m, f"not a Prometheus sample line: {line!r}"
        name, _, inner, value = m.groups()
        labels = tuple(sorted(_LABEL.findall(inner or "")))
        if inner:
            assert ",".join(f'{k}="{v}"' for k, v in _LABEL.findall(inner)) == inner, f"bad labels: {line!r}"
        family = re.sub(r"_(bucket|sum|count)$", "", name) if name not in types else name
        assert family in types, f"sample {name} has no # TYPE line"
        assert family in helps, f"sample {name} has no # HELP line"
        key = (name, labels)
        assert key not in samples, f"duplicate sample {line!r}"
        samples[key] = float(value)
    return samples, types


def metric(samples: dict, name: str, default: float | None = None, **labels) -> float:
    key = (name, tuple(sorted((k, str(v)) for k, v in labels.items())))
    if key not in samples:
        if default is not None:
            return default
        raise AssertionError(f"no sample {name}{labels or ''}; have {sorted(k for k in samples if k[0] == name)}")
    return samples[key]


def scrape(client: httpx.Client) -> dict:
    r = client.get("/metrics")
    assert r.status_code == 200, r.text
    return parse_metrics(r.text)[0]
