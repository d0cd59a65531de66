"""Time to first token where the systems differ most: prompt-tuning requests (PEFT re-runs their virtual
tokens through the model per request; the engine uses their cached keys/values).

Under load (every request arrives at t=0) the figures come from the timed runs; peft-seq, timed on a
subset, is extrapolated to all requests queued. Alone on an idle system, each request of the subset is
timed afresh on ours and on PEFT (`isolated_ttft`).
"""

from __future__ import annotations

import statistics

from bench.systems import run_ours, run_peft_sequential
from bench.timing import Result
from bench.workload import PROMPT_KINDS, Request, World

TRIES = 5  # isolated TTFT: best of this many


def peft_seq_ttft(seq: Result, requests: int) -> float:
    """Mean TTFT of peft-seq had all `requests` arrived at t=0: request k of N waits for the k before it,
    so the mean is mean request duration * (N - 1) / 2 + mean isolated TTFT (from the timed subset)."""
    durations, isolated = seq.extra["durations"], seq.extra["isolated_ttft"]
    return statistics.mean(durations) * (requests - 1) / 2 + statistics.mean(isolated.values())


def isolated_ttft(world: World, requests: list[Request],
                  tries: int = TRIES) -> tuple[dict[int, float], dict[int, float]]:
    """Each request alone on an idle system, ours (a fresh engine) and PEFT (load its adapter, then
    generate), alternating; the best of `tries` each. Returns (ours, peft) request index -> seconds."""
    ours, peft = {}, {}
    for r in requests:
        for _ in range(tries):
            o = run_ours(world, True, [r], new_tokens=1).ttft_s[r.index]
            p = run_peft_sequential(world, [r], new_tokens=1).extra["isolated_ttft"][r.index]
            ours[r.index] = min(o, ours.get(r.index, o))
            peft[r.index] = min(p, peft.get(r.index, p))
    return ours, peft


def prompt_ttft(world: World, results: dict[str, Result],
                seq_ttft_all: float) -> tuple[int, list[tuple[str, float, float]]]:
    """(prompt-tuning requests, rows of (what, ours seconds, PEFT seconds)); times the isolated rows."""
    prompt_reqs = [r for r in world.requests if world.variants[r.adapter] in PROMPT_KINDS]
    subset = world.requests[: world.args.peft_subset]
    prompt_subset = [r for r in subset if world.variants[r.adapter] in PROMPT_KINDS]
    ours_iso, peft_iso = isolated_ttft(world, prompt_subset) if prompt_subset else ({}, {})
    rows = []
    if prompt_reqs:
        under_load_ours = statistics.mean(results["ours-mixed"].ttft_s[r.index] for r in prompt_reqs)
        under_load_group = statistics.mean(results["peft-group"].ttft_s[r.index] for r in prompt_reqs)
        rows.append(("all arrive at t=0: ours-mixed vs peft-group (measured)", under_load_ours, under_load_group))
        rows.append(("all arrive at t=0: ours-mixed vs peft-seq (est. from subset)", under_load_ours, seq_ttft_all))
    if prompt_subset:
        rows.append((f"alone on an idle system, best of {TRIES}: ours vs PEFT (load + generate), "
                     f"{len(prompt_subset)} req.",
                     statistics.mean(ours_iso.values()), statistics.mean(peft_iso.values())))
    return len(prompt_reqs), rows
