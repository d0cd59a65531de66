"""Inline soft prompts against uploaded adapters: the same 64 requests over HTTP, each with its own
20-token soft prompt sent inline (`soft_prompt`, base64 safetensors), and each naming one of 64
uploaded prompt-tuning adapters holding the same embeddings.

    python -m bench.soft_prompts                 # 64 requests, 20 virtual tokens, 64 new tokens, fp32, 3 rounds
    python -m bench.soft_prompts --quick         # 8 requests, 8 new tokens, 1 round

What the inline path adds per request: decoding and checking the payload, and one forward of the
frozen model over its virtual tokens (on the engine thread, between steps) before it is admitted;
an uploaded adapter's prefix is materialized once, at upload. Both then run as a KV prefix.
`/v1/completions` with `stream=true`, all requests at once (`bench.peer`'s client), exactly
`--new-tokens` each (`ignore_eos`); the rounds alternate which side goes first, and the figure to
read is the median of the rounds' inline / uploaded throughput ratios. The tokens must agree (the
same embeddings, greedy, float32): printed as the share of requests whose texts are equal.
"""

from __future__ import annotations

import argparse
import base64
import json
import random
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import httpx
import torch
from safetensors.torch import save, save_file

from bench.peer import PRINTABLE, Server, free_port, run_bodies, run_client
from server.demo.tiny import save_tiny_model


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench.soft_prompts", description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--virtual", type=int, default=20, help="virtual tokens of every soft prompt")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--min-prompt", type=int, default=16)
    p.add_argument("--max-prompt", type=int, default=128)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--server-args", default="", help="extra flags for the server")
    p.add_argument("--startup-timeout", type=float, default=300)
    p.add_argument("--quick", action="store_true", help="8 requests, 8 new tokens, 1 round")
    args = p.parse_args(argv)
    if args.quick:
        args.requests, args.new_tokens, args.rounds = 8, 8, 1
    return args


def write_adapters(model_dir: Path, out: Path, embeddings: list[torch.Tensor]) -> list[Path]:
    """PEFT prompt-tuning adapters holding `embeddings`: the config PEFT writes, and its one tensor."""
    from peft import PromptTuningConfig

    n, hidden = embeddings[0].shape
    config = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=n, token_dim=hidden,
                                num_transformer_submodules=1, base_model_name_or_path=str(model_dir)).to_dict()
    config = json.loads(json.dumps(config, default=lambda v: sorted(v) if isinstance(v, set) else str(v)))
    dirs = []
    for i, e in enumerate(embeddings):
        d = out / f"sp{i:03d}"
        d.mkdir(parents=True)
        (d / "adapter_config.json").write_text(json.dumps(config))
        save_file({"prompt_embeddings": e.contiguous()}, d / "adapter_model.safetensors")
        dirs.append(d)
    return dirs


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="bench-soft-prompts-"))
    model_dir = root / "model"
    save_tiny_model(model_dir, "llama", seed=args.seed, hidden_size=args.hidden, num_layers=args.layers)
    generator = torch.Generator().manual_seed(args.seed + 1)
    embeddings = [torch.randn(args.virtual, args.hidden, generator=generator) * 0.5 for _ in range(args.requests)]
    adapter_dirs = write_adapters(model_dir, root / "peft", embeddings)
    rng = random.Random(args.seed)
    prompts = ["".join(chr(rng.choice(PRINTABLE)) for _ in range(rng.randint(args.min_prompt, args.max_prompt)))
               for _ in range(args.requests)]

    port = free_port()
    cmd = [sys.executable, "-m", "server", "--model", str(model_dir), "--adapter-dir", str(root / "store"),
           "--host", "127.0.0.1", "--port", str(port), "--dtype", args.dtype, "--device", "cpu",
           "--max-batch-size", str(max(64, args.requests)), "--max-waiting", str(max(256, 2 * args.requests)),
           "--log-level", "warning", *args.server_args.split()]
    server = Server("ours", cmd, None, port, root / "server.log", args.startup_timeout)
    server.start()
    try:
        with httpx.Client(base_url=server.url, trust_env=False, timeout=120) as client:
            for d in adapter_dirs:  # uploaded: validated and materialized now, as a user's upload is
                files = {f.name: (f.name, f.read_bytes()) for f in d.iterdir()}
                r = client.post("/adapters", data={"name": d.name}, files=files)
                r.raise_for_status()
        common = {"max_tokens": args.new_tokens, "temperature": 0, "stream": True, "ignore_eos": True,
                  "stream_options": {"include_usage": True}}
        inline = [{**common, "prompt": p, "soft_prompt": base64.b64encode(save({"embeddings": e})).decode()}
                  for p, e in zip(prompts, embeddings)]
        uploaded = [{**common, "prompt": p, "model": d.name} for p, d in zip(prompts, adapter_dirs)]
        workloads = {"inline": inline, "uploaded": uploaded}
        for bodies in workloads.values():  # warm-up: first batches, the event loop's first requests
            run_client(run_bodies(server.url, bodies[:4], counted_by_text=False))
        rates: dict[str, list[float]] = {name: [] for name in workloads}
        texts: dict[str, list[str]] = {}
        for r in range(args.rounds):
            order = list(workloads) if r % 2 == 0 else list(reversed(workloads))
            for name in order:
                outs, wall = run_client(run_bodies(server.url, workloads[name], counted_by_text=False))
                rates[name].append(sum(o.tokens for o in outs) / wall)
                texts[name] = [o.text for o in outs]
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)

    ratios = [i / u for i, u in zip(rates["inline"], rates["uploaded"])]
    agree = sum(a == b for a, b in zip(texts["inline"], texts["uploaded"]))
    result = {
        "requests": args.requests, "virtual_tokens": args.virtual, "new_tokens": args.new_tokens, "dtype": args.dtype,
        "inline_tok_s": max(rates["inline"]), "uploaded_tok_s": max(rates["uploaded"]),
        "ratio_median": statistics.median(ratios), "ratios": ratios, "texts_equal": agree,
    }
    print(f"{args.requests} requests x {args.new_tokens} new tokens, {args.virtual} virtual tokens each, "
          f"{args.dtype}, hidden {args.hidden}, {args.layers} layers, {args.rounds} rounds (HTTP, streamed)")
    for name in workloads:
        print(f"  {name:9s} best {max(rates[name]):7.1f} tok/s   rounds: "
              + ", ".join(f"{x:.1f}" for x in rates[name]))
    print(f"  inline / uploaded: median {result['ratio_median']:.3f}   rounds: "
          + ", ".join(f"{x:.3f}" for x in ratios))
    print(f"  same text, inline and uploaded: {agree}/{args.requests}")
    return result


if __name__ == "__main__":
    main()
