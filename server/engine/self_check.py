"""Start-up self-check: the runner's packed steps compute what transformers' plain forward computes.

The engine's forward relies on transformers internals (`attention.py` lists them) and on fast paths
of its own (`fast_path.py`: a written-out forward, packed linear kernels, a one-call native decode,
an attention kernel). A release that changes an internal, or a kernel that is wrong on this CPU,
would make the server generate wrong tokens without any error.

So before the engine serves, `Reference` runs transformers' own forward on the model's original
weights, before any fast path touches them: linear layers on plain F.linear, attention through
SDPA. It draws a few requests, one with a prompt-tuning prefix (virtual tokens as `inputs_embeds`
before its prompt), and, when the model has a sliding window of at most LONGEST tokens, one whose
prompt crosses it. `verify` then runs the runner through four packed steps: a prefill of all but
one, a step where all decode (the native decode's step), a step where they decode while the last
one prefills, and one where all decode; every request's logits are compared with the reference
over the same tokens. On a disagreement beyond the dtype's tolerance it logs the error, takes the
plain path (`--fast-path off`) and checks again; only if that disagrees too does the start stop.

Not covered: positions past `max_position_embeddings` under dynamic RoPE (the full-sequence
reference recomputes the cached keys with the longer length's frequencies, which generation does
not), and windows longer than LONGEST tokens (too costly a prefill at start on a large model).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from adapters import Adapter
from adapters.adapter import virtual_tokens_to_kv

from .cpu import linear as cpu_linear
from .fast_path import PLAIN
from .model_runner import ModelRunner, ScheduledStep
from .request import SamplingParams, Sequence

log = logging.getLogger(__name__)

TOLERANCE = {torch.float32: 1e-3}  # of the largest reference logit; half precision: HALF_TOLERANCE
HALF_TOLERANCE = 5e-2
LONGEST = 512  # a sliding window is crossed by a request when it is at most this many tokens
VIRTUAL = 3  # the prompt-tuning request's virtual tokens
PROMPTS = (6, 4)  # the first requests' prompt lengths; the first carries the prefix
LATE_PROMPT = 5  # the request that prefills while the others decode
STEPS = 4  # the packed steps run


class SelfCheckFailed(RuntimeError):
    pass


@dataclass
class _Request:
    ids: list[int]  # its prompt, then the tokens it feeds back (drawn up front, not sampled)
    prompt: int  # the prompt's length
    prefixed: bool  # whether it carries the virtual tokens
    joins: int  # the step it is admitted in


class Reference:
    """The requests of the check and transformers' logits for them, on the model's plain weights."""

    def __init__(self, model, spec):
        """Computed on the plain path: a model whose linears are packed is unpacked first (exactly)."""
        cpu_linear.unpack(model)
        self.dtype = spec.dtype
        g = torch.Generator().manual_seed(0)
        draw = lambda n: torch.randint(3, model.config.vocab_size, (n,), generator=g).tolist()  # noqa: E731
        embed = model.get_input_embeddings()
        with torch.inference_mode():
            self.virtual = embed(torch.tensor(draw(VIRTUAL), device=spec.device))  # [VIRTUAL, hidden]
        prompts = list(PROMPTS) + [n for n in [_window_prompt(model.config)] if n]
        self.requests = [_Request(draw(n + STEPS), n, i == 0, 0) for i, n in enumerate(prompts)]
        self.requests.append(_Request(draw(LATE_PROMPT + STEPS), LATE_PROMPT, False, 2))
        self.logits: dict[tuple[int, int], torch.Tensor] = {}  # (request, tokens through) -> [vocab] float32
        wanted = sorted({(self._through(r, step), i) for i, r in enumerate(self.requests) for step in range(r.joins, STEPS)})
        with torch.inference_mode():
            for length, i in wanted:  # shortest first: dynamic RoPE's frequencies only ever grow in one forward
                request = self.requests[i]
                embeds = embed(torch.tensor(request.ids[:length], device=spec.device))
                if request.prefixed:
                    embeds = torch.cat([self.virtual, embeds])
                self.logits[i, length] = model(inputs_embeds=embeds[None]).logits[0, -1].float()

    @staticmethod
    def _through(request: _Request, step: int) -> int:
        """How many of its tokens a request has fed in once step `step` has run."""
        return request.prompt + (step - request.joins)


def verify(runner: ModelRunner, reference: Reference) -> dict:
    """Check the runner's paths against `reference` (leaving it idle); on a disagreement, log it, take
    the plain path and check again. Returns what /info shows of it; raises SelfCheckFailed when the plain
    path disagrees too."""
    taken = runner.describe()
    try:
        error = check(runner, reference)
        return {"passed": True, "relative_error": error, "paths_checked": taken}
    except SelfCheckFailed as exc:
        if not runner.paths.enabled and runner.compiled is None:
            raise
        log.error("self-check failed on the fast paths (%s): %s; serving through the plain path "
                  "(transformers' forward, plain linears, SDPA attention) instead", taken, exc)
        runner.use(PLAIN, None)
        error = check(runner, reference)
        return {"passed": False, "failure": str(exc), "paths_checked": taken, "relative_error_plain": error}


def check_runner(runner: ModelRunner) -> float:
    """`check` against a reference computed now, on the plain path, the runner's paths taken again after."""
    paths, compiled = runner.paths, runner.compiled
    runner.use(PLAIN, None)
    reference = Reference(runner.model, runner.spec)
    runner.use(paths, compiled)
    return check(runner, reference)


@torch.inference_mode()
def check(runner: ModelRunner, reference: Reference) -> float:
    """Run the check's steps on an idle runner (left idle); returns the worst relative error, raises
    SelfCheckFailed naming the model class, the transformers version, the paths and the step."""
    import transformers

    model, spec = runner.model, runner.spec
    started = time.perf_counter()
    adapter = Adapter("self-check", "PROMPT_TUNING", VIRTUAL, "self-check", 0.0, {},
                      virtual_tokens_to_kv(model, reference.virtual), reference.virtual)
    seqs = [Sequence(r.ids[:r.prompt], SamplingParams(max_new_tokens=STEPS), adapter if r.prefixed else None)
            for r in reference.requests]
    tolerance = TOLERANCE.get(spec.dtype, HALF_TOLERANCE)
    worst = 0.0
    try:
        for step in range(STEPS):
            running = [i for i, r in enumerate(reference.requests) if r.joins <= step]
            joining = [i for i in running if reference.requests[i].joins == step]
            scheduled = ScheduledStep(decode=[seqs[i] for i in running if i not in joining],
                                      prefill=[(seqs[i], seqs[i].pending) for i in joining])
            batch, logits = runner.forward(scheduled)
            for seq, got in zip(batch, logits):
                i = next(j for j, s in enumerate(seqs) if s is seq)
                request = reference.requests[i]
                want = reference.logits[i, Reference._through(request, step)]
                error = float((got.float() - want).abs().max() / want.abs().max().clamp_min(1e-6))
                worst = max(worst, error)
                if not error <= tolerance:
                    kind = "prefill" if i in joining else "decode"
                    raise SelfCheckFailed(
                        f"{type(model).__name__} under transformers {transformers.__version__}: the packed "
                        f"forward's {kind} logits (step {step + 1}, request {i + 1} of {len(seqs)}) differ from "
                        f"transformers' own forward (relative error {error:.2e}, tolerance {tolerance:.0e} for "
                        f"{spec.dtype}) on paths {runner.describe()}; the server would generate wrong tokens. "
                        "Install through constraints.txt (the tested versions) or report it.")
                seq.output_ids.append(request.ids[len(seq.token_ids)])  # the next token, fed back next step
    finally:
        runner.reset()
    log.info("self-check: the packed forward agrees with transformers (relative error %.1e) in %.0f ms on %s",
             worst, (time.perf_counter() - started) * 1e3, runner.describe())
    return worst


def _window_prompt(config) -> int:
    """A prompt length that crosses the model's smallest sliding window, if it has one of at most LONGEST."""
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None) or []
    if not window or (types and "sliding_attention" not in types) or getattr(config, "use_sliding_window", True) is False:
        return 0
    return window + 3 if window + 3 + STEPS <= LONGEST else 0
