"""Start-up self-check: the packed forward computes what transformers computes.

The engine's forward relies on transformers internals (`attention.py` lists them). A release that
changes one of them could make the server produce wrong tokens without any error. So before it
serves, the server runs two short packed steps, a prefill then a decode, of two requests (one
with a prompt-tuning prefix materialized from real token embeddings, one without) and compares
each request's logits with transformers' own forward over the same tokens (the virtual tokens as
`inputs_embeds` before the prompt). A disagreement beyond the dtype's tolerance stops the start.
"""

from __future__ import annotations

import logging
import time

import torch

from adapters import Adapter
from adapters.adapter import virtual_tokens_to_kv

from .model_runner import ModelRunner, ScheduledStep
from .request import SamplingParams, Sequence

log = logging.getLogger(__name__)

TOLERANCE = {torch.float32: 1e-3}  # of the largest reference logit; half precision: HALF_TOLERANCE
HALF_TOLERANCE = 5e-2


class SelfCheckFailed(RuntimeError):
    pass


@torch.inference_mode()
def check_packed_forward(runner: ModelRunner) -> float:
    """Run the check on an idle runner (left idle); returns the worst relative error, raises
    SelfCheckFailed naming the model class and the transformers version when it is too large."""
    import transformers

    model, spec = runner.model, runner.spec
    started = time.perf_counter()
    g = torch.Generator().manual_seed(0)
    draw = lambda n: torch.randint(3, model.config.vocab_size, (n,), generator=g).tolist()  # noqa: E731
    embed = model.get_input_embeddings()
    virtual = embed(torch.tensor(draw(3), device=spec.device))  # [3, hidden]
    adapter = Adapter("self-check", "PROMPT_TUNING", 3, "self-check", 0.0, {}, virtual_tokens_to_kv(model, virtual),
                      virtual)
    seqs = [Sequence(draw(6), SamplingParams(max_new_tokens=2), adapter), Sequence(draw(4), SamplingParams(max_new_tokens=2))]
    worst = 0.0
    try:
        for phase in ("prefill", "decode"):
            if phase == "decode":
                for seq in seqs:
                    seq.output_ids.append(draw(1)[0])
                step = ScheduledStep(decode=seqs)
            else:
                step = ScheduledStep(prefill=[(s, s.pending) for s in seqs])
            batch, logits = runner.forward(step)
            for seq, got in zip(batch, logits):
                ids = torch.tensor(seq.prompt_ids + seq.output_ids, device=spec.device)
                embeds = embed(ids)
                if seq.adapter is not None:
                    embeds = torch.cat([seq.adapter.embeddings, embeds])
                want = model(inputs_embeds=embeds[None]).logits[0, -1].float()
                error = float((got.float() - want).abs().max() / want.abs().max().clamp_min(1e-6))
                worst = max(worst, error)
                tolerance = TOLERANCE.get(spec.dtype, HALF_TOLERANCE)
                if not error <= tolerance:
                    raise SelfCheckFailed(
                        f"{type(model).__name__} under transformers {transformers.__version__}: the packed "
                        f"forward's {phase} logits differ from transformers' own forward (relative error "
                        f"{error:.2e}, tolerance {tolerance:.0e} for {spec.dtype}); the server would generate "
                        "wrong tokens. Install through constraints.txt (the tested versions) or report it.")
    finally:
        runner.reset()
    log.info("self-check: packed forward agrees with transformers (relative error %.1e) in %.0f ms",
             worst, (time.perf_counter() - started) * 1e3)
    return worst
