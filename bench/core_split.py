"""What an engine-core process would give, measured before building it: the engine stepping in one
process while another process writes its streams, against the engine alone and against the server.

    python -m bench.core_split                  # 64 requests, 64 new tokens, fp32, 5 rounds

Three sides per round, on the peer benchmark's model and prompts (base workload), the order
rotating between rounds:
- in-process: `bench.serving`'s `InProcess`, the engine stepped to the end on this thread;
- split: the same engine, stepped on this thread the same way, while a second process (this module
  with `--api`: uvicorn, an ASGI app, the SSE chunks written from one callback per step with
  `server.api.sse`'s `_start_now`) streams its tokens to `bench.peer`'s client in a third process.
  After each step this process sends the step's new text of every stream, length-prefixed pickle
  over a Unix socket, as an engine core would send its outputs; the API process tokenizes each
  prompt as it arrives and tells the engine to start once every request is in. No GIL is shared
  between the engine and the process that writes to the sockets;
- http: the server as it is (`softprompt-server`, engine thread and event loop in one process).

The split side leaves out what the real API process would also do (FastAPI's routing, validation
and middleware, metrics, the disconnect watch), so it is an upper bound on what the split gives.
tokens/s is the engine's: generated tokens over the time from the start of its first step to the
end of its last (split), or the client's (http).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import pickle
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).parent.parent  # the repository: the API process and the client run from it
_FRAME = struct.Struct("<I")
_HEAD = ('{"id": "cmpl-0123456789abcdef0123456789abcdef", "object": "text_completion", '
         '"created": 1764380000, "model": "base", "choices": [')  # the size of ours' fixed fields


def api_main(port: int, sock_path: str, expected: int, model_dir: str) -> None:
    """The API process: answers `expected` streamed /v1/completions, then waits for the next batch."""
    import uvicorn
    from transformers import AutoTokenizer

    from server.api.sse import _start_now

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    sends: dict[int, object] = {}
    ends: dict[int, asyncio.Future] = {}
    core: list[asyncio.Transport] = []

    def chunk(i: int, text: str, finish: str | None) -> str:
        return f"data: {_HEAD}{json.dumps({'index': i, 'text': text, 'finish_reason': finish, 'logprobs': None})}]}}\n\n"

    def body(text: str) -> dict:
        return {"type": "http.response.body", "body": text.encode(), "more_body": True}

    class Outputs(asyncio.Protocol):
        """The engine's outputs, one frame per step: [(stream, new text, finished), ...]."""

        def __init__(self):
            self.buf = b""

        def connection_made(self, transport):
            core.append(transport)

        def data_received(self, data):
            self.buf += data
            while len(self.buf) >= _FRAME.size:
                (n,) = _FRAME.unpack_from(self.buf)
                if len(self.buf) < _FRAME.size + n:
                    return
                outputs, self.buf = pickle.loads(self.buf[_FRAME.size:_FRAME.size + n]), self.buf[_FRAME.size + n:]
                for i, text, finished in outputs:
                    send = sends[i]
                    if not finished:
                        _start_now(send(body(chunk(i, text, None))))
                        continue
                    _start_now(send(body(chunk(i, text, "length") + "data: [DONE]\n\n")))
                    _start_now(send({"type": "http.response.body", "body": b"", "more_body": False}))
                    ends.pop(i).set_result(None)

    async def app(scope, receive, send):
        if scope["type"] == "lifespan":
            while (message := await receive())["type"] != "lifespan.shutdown":
                await asyncio.get_running_loop().create_unix_server(Outputs, sock_path)
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        raw = b""
        while True:
            message = await receive()
            raw += message.get("body", b"")
            if not message.get("more_body"):
                break
        tokenizer(json.loads(raw)["prompt"]).input_ids  # as the real API process would
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]})
        i = len(sends)
        sends[i], ends[i] = send, asyncio.get_running_loop().create_future()
        if len(sends) == expected:
            core[0].write(b"go")
        await ends[i]
        if not ends:
            sends.clear()

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", loop="uvloop", http="httptools")


class Split:
    """The split side: the API process, its socket to this process, and the client's command."""

    def __init__(self, local, setup, pargs, tmp: Path):
        from bench.peer import free_port, workloads

        self.local = local
        port, sock_path = free_port(), str(tmp / "core.sock")
        self.api = subprocess.Popen([sys.executable, "-m", "bench.core_split", "--api", str(port), sock_path,
                                     str(len(local.prompts)), str(setup.model_dir)], cwd=ROOT)
        deadline = time.monotonic() + 120
        while not os.path.exists(sock_path):
            if self.api.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the API process did not start")
            time.sleep(0.1)
        self.conn = socket.socket(socket.AF_UNIX)
        self.conn.connect(sock_path)

        target = SimpleNamespace(url=f"http://127.0.0.1:{port}", model="base")  # what workloads() reads of a server
        bodies = workloads("ours", target, pargs, setup, "float32")["base"][0]
        (tmp / "client.json").write_text(json.dumps({"url": target.url, "bodies": bodies, "masked": setup.masked}))
        self.client = [sys.executable, "-c", "import json, sys; from bench.peer import run_client, run_bodies; "
                       f"c = json.load(open({str(tmp / 'client.json')!r})); "
                       "outs, wall = run_client(run_bodies(c['url'], c['bodies'], c['masked'])); "
                       "print(sum(o.tokens for o in outs) / wall)"]

    def run(self):
        """The engine's tokens/s, its steps, and the client's tokens/s."""
        from bench.serving import Steps
        from server.engine.request import Sequence

        engine = self.local.engine
        client = subprocess.Popen(self.client, stdout=subprocess.PIPE, text=True, cwd=ROOT)
        if self.conn.recv(2) != b"go":
            raise RuntimeError("the API process went away")
        before, t = Steps.of(engine), time.perf_counter()
        seqs = [engine.submit(Sequence(ids, self.local.params, None)) for ids in self.local.prompts]
        sent: list[int | None] = [0] * len(seqs)  # characters sent; None once the end is
        while engine.has_work():
            engine.step()
            outputs = []
            for i, seq in enumerate(seqs):
                if sent[i] is not None and (len(seq.text) > sent[i] or seq.finished):
                    outputs.append((i, seq.text[sent[i]:], seq.finished))
                    sent[i] = None if seq.finished else len(seq.text)
            frame = pickle.dumps(outputs)
            self.conn.sendall(_FRAME.pack(len(frame)) + frame)
        wall = time.perf_counter() - t
        steps = replace(Steps.of(engine) - before, wall=wall)
        return sum(len(s.output_ids) for s in seqs) / wall, steps, float(client.communicate()[0])

    def close(self):
        self.conn.close()
        self.api.terminate()
        self.api.wait()


def main(argv: list[str] | None = None) -> dict[str, list[float]]:
    """Prints the table; returns each side's tokens/s per round, and the split's client's ("client")."""
    from bench.peer import build_setup, make_server, warm_up, workloads
    from bench.peer import parse_args as peer_args
    from bench.serving import InProcess, Steps, over_http

    p = argparse.ArgumentParser(prog="python -m bench.core_split", description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    pargs = peer_args(["--requests", str(args.requests), "--new-tokens", str(args.new_tokens), "--single", "0"])
    sides = ("in-process", "split", "http")
    rates = {side: [] for side in sides}
    client_rates, steps = [], {side: Steps() for side in sides[:2]}
    with tempfile.TemporaryDirectory(prefix="bench-split-") as tmp:
        setup = build_setup(pargs, Path(tmp))
        local = InProcess(setup, args, "float32")
        split = Split(local, setup, pargs, Path(tmp))
        server = make_server("ours", pargs, setup, "float32", None, Path(tmp) / "logs", "split")
        try:
            server.start()
            warm_up("ours", server, pargs, setup, "float32")
            bodies = workloads("ours", server, pargs, setup, "float32")["base"][0]
            gc.collect()
            gc.freeze()
            for rep in range(args.repeats):
                for side in sides[rep % 3:] + sides[:rep % 3]:
                    if side == "in-process":
                        rate, spent = local.run("base")
                    elif side == "split":
                        rate, spent, seen = split.run()
                        client_rates.append(seen)
                    else:
                        rate, spent, _, _ = over_http(server, bodies, setup, None)
                    rates[side].append(rate)
                    if side in steps:
                        steps[side] += spent
                print(f"  round {rep + 1}: " + ", ".join(f"{side} {rates[side][-1]:.1f}" for side in sides)
                      + f" tok/s (the split's client saw {client_rates[-1]:.1f})", flush=True)
        finally:
            server.stop()
            split.close()
    print(f"\nbase, {args.requests} requests x {args.new_tokens} new tokens, float32, {len(os.sched_getaffinity(0))} CPUs; "
          "over in-process, median of the rounds' pairs (pooled):")
    for side in sides[1:]:
        pairs = [r / a for r, a in zip(rates[side], rates["in-process"])]
        pooled = sum(1 / r for r in rates["in-process"]) / sum(1 / r for r in rates[side])
        print(f"  {side:6s} {statistics.median(pairs):.3f} ({pooled:.3f})")
    seen = [c / a for c, a in zip(client_rates, rates["in-process"])]
    print(f"  split, as its client saw it: {statistics.median(seen):.3f}")
    for side, spent in steps.items():
        print(f"engine steps {side + ':':12s} {spent.describe()}")
    return rates | {"client": client_rates}


if __name__ == "__main__":
    if sys.argv[1:2] == ["--api"]:
        api_main(int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), sys.argv[5])
    else:
        main()
