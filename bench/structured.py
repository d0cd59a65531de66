"""The cost of structured output: engine throughput with some requests JSON-schema constrained.

The bench model and adapters (`workload.build_world`), `--requests` requests each making exactly
`--new-tokens` tokens (ignore_eos), all submitted at once, run in-process:

  unconstrained   no request constrained
  constrained     `--constrained` of them (spread through the batch) under a JSON schema that cannot
                  complete within the budget (an array of at least 50 small objects), so every
                  request still makes the same tokens' count and only the masking differs

Rounds alternate the two; each one's fastest run is kept. Prints both in tokens/s and the ratio.

    python -m bench.structured              # 64 requests, 16 constrained, 64 new tokens
    python -m bench.structured --quick      # a small config (smoke test)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from bench.process import quiet, torch_threads
from bench.workload import build_world
from server.engine.engine import Engine
from server.engine.grammar import Grammars, GrammarSpec, vocab_size
from server.engine.request import SamplingParams, Sequence

SCHEMA = {"type": "array", "minItems": 50, "items": {
    "type": "object", "required": ["name", "age", "tag"], "additionalProperties": False,
    "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer", "minimum": 0},
                   "tag": {"enum": ["red", "green", "blue"]}}}}


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench.structured", description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--constrained", type=int, default=16)
    p.add_argument("--adapters", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--min-prompt", type=int, default=16)
    p.add_argument("--max-prompt", type=int, default=128)
    p.add_argument("--min-virtual", type=int, default=8)
    p.add_argument("--max-virtual", type=int, default=32)
    p.add_argument("--max-prefill-tokens", type=int, default=4096)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.hidden, args.layers, args.requests, args.constrained, args.new_tokens, args.rounds = 128, 2, 16, 4, 16, 1
        args.adapters, args.max_prompt = 4, 32
    return args


def run(world, grammars: Grammars | None, constrained: int) -> tuple[float, int]:
    """One run: (seconds, tokens). `constrained` requests, spread evenly, under SCHEMA."""
    args, base = world.args, world.base
    engine = Engine(base.model, base.tokenizer, base.spec, max_batch_size=len(world.requests),
                    max_waiting=max(256, len(world.requests)), max_prefill_tokens=args.max_prefill_tokens)
    compiled = grammars.compile(GrammarSpec.json_schema(SCHEMA, "bench")) if constrained else None
    every = len(world.requests) // constrained if constrained else 0
    params = SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True)
    start = time.perf_counter()
    seqs = []
    for i, r in enumerate(world.requests):
        constraint = compiled.constraint() if every and i % every == 0 and i // every < constrained else None
        seqs.append(engine.submit(Sequence(list(r.prompt), params, world.adapters[r.adapter], constraint=constraint)))
    while engine.has_work():
        engine.step()
    seconds = time.perf_counter() - start
    assert all(len(s.output_ids) == args.new_tokens for s in seqs), "a request did not make new_tokens tokens"
    assert sum(s.constraint is not None for s in seqs) == constrained
    return seconds, sum(len(s.output_ids) for s in seqs)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    with quiet(), torch_threads(args.threads), tempfile.TemporaryDirectory(prefix="bench-structured-") as tmp:
        world = build_world(args, Path(tmp))
        grammars = Grammars(world.base.tokenizer, vocab_size(world.model), {world.base.tokenizer.eos_token_id})
        run(world, grammars, args.constrained)  # warm-up: kernels, the vocabulary, the compiled grammar
        best = {"unconstrained": float("inf"), "constrained": float("inf")}
        tokens = 0
        for _ in range(args.rounds):
            for name, n in (("unconstrained", 0), ("constrained", args.constrained)):
                seconds, tokens = run(world, grammars, n)
                best[name] = min(best[name], seconds)
    rates = {name: tokens / s for name, s in best.items()}
    ratio = rates["constrained"] / rates["unconstrained"]
    print(f"{args.requests} requests x {args.new_tokens} tokens, hidden {args.hidden}, {args.layers} layers, "
          f"{args.dtype}, best of {args.rounds}")
    print(f"  unconstrained              {rates['unconstrained']:8.1f} tok/s")
    print(f"  {args.constrained:2d} JSON-schema constrained  {rates['constrained']:8.1f} tok/s")
    print(f"  ratio                      {ratio:8.3f}")
    return {**rates, "ratio": ratio}


if __name__ == "__main__":
    main()
