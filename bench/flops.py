"""The model's useful FLOPs, this machine's matmul ceiling at the model's linear shapes, and the
engine's achieved FLOP/s as a fraction of that ceiling (see bench/README.md, "FLOPs")."""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass

import torch

from bench.timing import Result, sync
from bench.workload import World
from server.engine.cpu import linear as cpu_linear


def linear_shapes(model) -> list[tuple[str, int, int, int]]:
    """(name, in_features, out_features, count per token) of the decoder layers' linear maps."""
    counts: dict[tuple[str, int, int], int] = defaultdict(int)
    for layer in model.model.layers:
        for name, mod in layer.named_modules():
            if isinstance(mod, torch.nn.Linear):
                counts[(name.split(".")[-1], mod.in_features, mod.out_features)] += 1
    return [(n, i, o, c) for (n, i, o), c in counts.items()]


def layer_params(model) -> int:
    return sum(cpu_linear.weight_numel(m) for layer in model.model.layers for m in layer.modules())


def model_flops(world: World, with_adapters: bool) -> dict[str, float]:
    """Useful FLOPs of serving the requests: no padding, virtual tokens not re-run (their K/V are cached).

    linear:    2 * decoder-layer parameters per processed token (prompt tokens + generated tokens but
               the last, which is sampled and never fed back)
    lm_head:   2 * hidden * vocab per sampled token (the engine keeps one row of logits per step)
    attention: 4 * hidden * context per layer per processed token (Q.K^T and P.V over the keys the token
               sees: its prefix, the prompt and generated tokens before it, and itself)
    """
    model, args = world.model, world.args
    cfg = model.config
    hidden, layers, vocab = cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size
    q_width = cfg.num_attention_heads * (getattr(cfg, "head_dim", None) or hidden // cfg.num_attention_heads)
    p_layers = layer_params(model)
    processed = linear = attention = 0
    for r in world.requests:
        prefix = world.virtual[r.adapter] if with_adapters else 0
        steps = len(r.prompt) + args.new_tokens - 1
        processed += steps
        # token j (0-based among prompt + fed-back tokens) sees prefix + j + 1 keys
        context = steps * prefix + steps * (steps + 1) // 2
        attention += 4 * q_width * context * layers
    linear = 2 * p_layers * processed
    lm_head = 2 * hidden * vocab * len(world.requests) * args.new_tokens
    return {"linear": linear, "lm_head": lm_head, "attention": attention, "total": linear + lm_head + attention,
            "processed_tokens": processed, "simple": 2 * (p_layers + hidden * vocab) * processed}


def _time_linear(m: int, k: int, n: int, device, dtype, repeats: int) -> float:
    """Best seconds per F.linear([m, k] x [n, k]^T) call, over `repeats` timed loops."""
    x = torch.randn(m, k, device=device, dtype=dtype)
    w = torch.randn(n, k, device=device, dtype=dtype)
    f = torch.nn.functional.linear
    with torch.inference_mode():
        for _ in range(3):
            f(x, w)
        sync(device)
        t = time.perf_counter()
        f(x, w)
        sync(device)
        once = max(time.perf_counter() - t, 1e-7)
        iters = max(1, min(1000, int(0.03 / once)))
        best = float("inf")
        for _ in range(repeats):
            sync(device)
            t = time.perf_counter()
            for _ in range(iters):
                f(x, w)
            sync(device)
            best = min(best, (time.perf_counter() - t) / iters)
    return best


def matmul_ceiling(world: World, batch: int, repeats: int = 5) -> dict:
    """FLOP/s of the model's linear shapes at `batch` rows: per shape, and for one whole forward
    (total FLOPs / total best times, lm_head included)."""
    model = world.model
    cfg = model.config
    shapes = linear_shapes(model) + [("lm_head", cfg.hidden_size, cfg.vocab_size, 1)]
    per_shape, total_flops, total_time = {}, 0.0, 0.0
    for name, k, n, count in shapes:
        best = _time_linear(batch, k, n, world.device, world.base.spec.dtype, repeats)
        flops = 2 * batch * k * n
        per_shape[f"{name} [{batch}x{k}]x[{k}x{n}]"] = flops / best
        total_flops += flops * count
        total_time += best * count
    return {"per_shape": per_shape, "flops_per_s": total_flops / total_time, "batch": batch}


@dataclass
class FlopFigures:
    counted: dict[str, float]  # model_flops of ours-mixed (with adapters)
    ceiling: dict  # matmul_ceiling at the decode shapes (batch = requests)
    prefill_batch: int  # rows of the prefill-shape ceiling: min(prefill budget, prompt tokens)
    ceiling_prefill: dict  # matmul_ceiling at the prefill shapes
    prompt_tokens: int  # processed tokens that are prompt tokens
    decode_tokens: int  # processed tokens that are generated tokens fed back
    achieved: float  # counted FLOPs / ours-mixed wall time
    achieved_simple: float  # 2 x non-embedding params x processed tokens / ours-mixed wall time
    mix_ceiling: float  # prompt tokens at the prefill-shape rate, the rest at the decode-shape rate

    @property
    def fraction(self) -> float:
        """Achieved over the decode-shape ceiling: the figure the goal is set on."""
        return self.achieved / self.ceiling["flops_per_s"]


def flop_figures(world: World, mixed: Result) -> FlopFigures:
    """Counts ours-mixed's FLOPs and times the matmul ceilings (decode shapes, then prefill shapes)."""
    reqs, args = world.requests, world.args
    flops = model_flops(world, True)
    ceiling = matmul_ceiling(world, len(reqs))
    prefill_batch = min(args.max_prefill_tokens, sum(len(r.prompt) for r in reqs))
    ceiling_prefill = matmul_ceiling(world, prefill_batch, repeats=3)
    decode_tokens = len(reqs) * (args.new_tokens - 1)
    prompt_tokens = flops["processed_tokens"] - decode_tokens
    # the best a perfect engine could do: prompt tokens at the prefill-shape rate, the rest at the decode-shape rate
    per_token = flops["total"] / flops["processed_tokens"]
    mix_time = prompt_tokens * per_token / ceiling_prefill["flops_per_s"] + decode_tokens * per_token / ceiling["flops_per_s"]
    return FlopFigures(flops, ceiling, prefill_batch, ceiling_prefill, prompt_tokens, decode_tokens,
                       flops["total"] / mixed.wall_s, flops["simple"] / mixed.wall_s, flops["total"] / mix_time)
