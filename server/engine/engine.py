"""The step loop: `scheduler.schedule()` -> `runner.run(step)` -> deliver the step's tokens.

`Engine` is synchronous and single-threaded in its stepping; `async_engine.AsyncEngine` runs it on a
background thread and hands each step's tokens to asyncio in one message per step.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import Counter
from typing import Callable

from adapters import Adapter, ModelSpec

from . import self_check
from .cpu import memory as cpu_memory
from .compiled import CompiledForward, warm_up
from .detokenizer import IncrementalDetokenizer
from .fast_path import FastPaths
from .kv_cache import DEFAULT_KV_CACHE_BYTES
from .model_runner import ModelRunner, ScheduledStep, StepOutput
from .request import (FinishReason, GenerationFailed, InvalidRequest, Overloaded, SamplingParams, Sequence,
                      TokenEvent)
from .scheduler import Scheduler

log = logging.getLogger(__name__)


class Engine:
    def __init__(self, model, tokenizer, spec: ModelSpec, max_batch_size: int = 64, max_waiting: int = 256,
                 max_prefill_tokens: int = 2048, kv_cache_bytes: int = DEFAULT_KV_CACHE_BYTES, compile: bool = False,
                 paths: FastPaths = FastPaths(), check: bool = False):
        """kv_cache_bytes: the KV pool, allocated once; requests are admitted and preempted to fit it.
        compile: run the packed forward compiled (`compiled.py`), compiling it now. paths: the fast paths
        to take (ValueError when one forced on cannot run here). check: run the start-up self-check
        (`self_check.py`), falling back to the plain path if the fast ones disagree with it (SelfCheckFailed
        if the plain one does too); its result is `self.self_check`."""
        self.tokenizer = tokenizer
        if spec.device.type == "cpu":
            cpu_memory.keep_freed_memory()  # a step's activations reused, not mapped anew (its docstring)
        reference = self_check.Reference(model, spec) if check else None  # before any fast path is taken
        compiled = CompiledForward(model, spec.device, max_batch_size + max_prefill_tokens) if compile else None
        self.runner = ModelRunner(model, spec, kv_cache_bytes, compiled, paths, max_batch_size)
        if compiled is not None:
            try:
                compiled.seconds = warm_up(self.runner)
            except Exception as exc:  # no compiler, an unsupported op or device: serve eager rather than not at all
                log.warning("torch.compile of the packed forward failed (%s: %s); running it eager",
                            type(exc).__name__, str(exc).strip().splitlines()[0] if str(exc).strip() else "")
                self.runner.use_compiled(None)
        self.self_check = self_check.verify(self.runner, reference) if reference is not None else None
        self.scheduler = Scheduler(max_batch_size, max_waiting, max_prefill_tokens, self.runner.pool)
        self.eos_ids = _eos_ids(model, tokenizer)
        self.runner.eos_ids = frozenset(self.eos_ids)
        self.vocab_size = _vocab_size(model)  # logit_bias, stop_token_ids: ids below it
        self.special_ids = set(tokenizer.all_special_ids)
        self._lock = threading.Lock()  # guards the scheduler's queues between submitters and the stepper
        self.accepting = True
        self.stats = Counter()  # steps, failed_steps, prefill_tokens, requests_finished; of the steps that ran:
        # step_seconds, and forward_seconds in the model's forward
        self.last_batch_size = 0
        self.consecutive_failures = 0  # forwards failed since the last that served a request: /health's verdict
        self.last_failure = ""
        self.emit: Callable[[list[Delivery]], None] = _call_back  # AsyncEngine: to the event loop

    def submit(self, seq: Sequence) -> Sequence:
        """Queue a request, with its siblings (`Sequence.siblings`: more answers to its prompt, forked
        from it once its prompt is computed); raises Overloaded when the queue is full or the engine is
        stopping. The first of a group draws with the seed, sibling i with seed + i."""
        if not self.accepting:
            raise Overloaded("the server is shutting down", retry_after=5)
        self.check_fits(seq.prefix_length, len(seq.prompt_ids), seq.params.max_new_tokens, len(seq.group))
        seq.params.check_token_ids(self.vocab_size)
        seed = seq.params.seed if seq.params.seed is not None else random.getrandbits(63)
        for i, member in enumerate(seq.group):
            member.seed = (seed + i) % 2**63
            member.detokenizer = IncrementalDetokenizer(self.tokenizer, member.prompt_ids,
                                                        member.params.skip_special_tokens)
        with self._lock:
            self.scheduler.add(seq)
        return seq

    def check_fits(self, prefix: int, prompt: int, max_new_tokens: int, answers: int = 1, param: str = "n") -> None:
        """InvalidRequest if a request of these sizes, asked for `answers` answers (named `param`), could
        never run: more answers than the batch takes, or more tokens than the KV pool holds, even alone
        (its adapter's prefix then in the pool for it alone, once: its answers share it)."""
        if answers > self.scheduler.max_running:
            raise InvalidRequest(param, f"{answers} answers to one prompt is more than the {self.scheduler.max_running} "
                                 "requests the server decodes together (--max-batch-size)")
        own = prompt + max_new_tokens
        if prefix + own * answers > self.runner.usable_slots:
            sizes = f"prompt ({prompt}) + max_new_tokens ({max_new_tokens})"
            sizes = f"({sizes}) × {answers} answers" if answers > 1 else sizes
            raise InvalidRequest("max_new_tokens", (
                f"virtual tokens ({prefix}) + {sizes} = {prefix + own * answers} tokens, more than the KV cache "
                f"holds ({self.runner.usable_slots} tokens, --kv-cache-memory)"))

    def abort(self, seq: Sequence) -> None:
        """Stop a request from any thread: it leaves the batch at the next step and frees its KV segment.
        A request whose siblings are not forked yet takes them with it."""
        for member in seq.group:
            member.aborted = True

    def has_work(self) -> bool:
        return len(self.scheduler) > 0

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    def step(self) -> list[StepOutput]:
        started, forwards = time.perf_counter(), self.runner.forward_seconds
        try:
            with self._lock:
                step = self.scheduler.schedule()
            outputs = self._run(step)
            if self.runner.forks:
                with self._lock:
                    self.scheduler.adopt(self.runner.forks)
        except Exception as exc:
            self._count_failure(exc)
            self.fail_all(GenerationFailed(f"generation failed: {exc}"))
            raise
        if outputs:  # a forward that served someone: the device works
            self.consecutive_failures = 0
        self.stats["steps"] += 1
        self.stats["prefill_tokens"] += sum(n for _, n in step.prefill)
        self.last_batch_size = len(outputs)
        deliveries = []
        for out in outputs:
            try:
                delivery = self._deliver(out)
            except Exception as exc:  # this request's text or stop check failed: it alone ends
                log.exception("delivering a token failed; ending that request")
                out.seq.aborted = True
                delivery = (out.seq, GenerationFailed(f"generation failed: {exc}")) if out.seq.on_token else None
            if delivery is not None:
                deliveries.append(delivery)
        self.emit(deliveries)
        self.stats["step_seconds"] += time.perf_counter() - started
        self.stats["forward_seconds"] += self.runner.forward_seconds - forwards  # the self-check's are not steps'
        return outputs

    def _run(self, step: ScheduledStep) -> list[StepOutput]:
        """A step that fails with newcomers in it (admitted in this step: they held no KV before) is
        run again without them, and they alone fail (a prompt that runs out of memory, say); the
        decodes and the prompts part-way through a chunked prefill go on. A step that fails without
        newcomers, or again without them, raises."""
        newcomers = [seq for seq, _ in step.prefill if seq.segment is None]
        try:
            return self.runner.run(step)
        except Exception as exc:
            if not newcomers:
                raise
            self._count_failure(exc)
            log.exception("a step with %d newcomers failed; running it again without them", len(newcomers))
            with self._lock:  # the scheduler drops them at the next step
                ended = _abort(newcomers, GenerationFailed(f"generation failed: {exc}"))
            self.emit(ended)
            dropped = set(newcomers)
            continuing = [(seq, n) for seq, n in step.prefill if seq not in dropped]
            return self.runner.run(ScheduledStep(decode=step.decode, prefill=continuing))

    def _count_failure(self, exc: Exception) -> None:
        self.stats["failed_steps"] += 1
        self.consecutive_failures += 1
        self.last_failure = f"{type(exc).__name__}: {exc}"

    def abort_all(self, error: Exception) -> None:
        """From any thread: end every request with `error`; their KV segments are freed at the next step."""
        with self._lock:
            ended = _abort(list(self.scheduler.running) + list(self.scheduler.waiting), error)
        self.emit(ended)

    def fail_all(self, error: Exception) -> None:
        """After a failed step, on the stepping thread: end every request and start from an empty batch.
        One acquisition of the lock, so a request submitted meanwhile is either ended here or kept."""
        with self._lock:
            ended = _abort(list(self.scheduler.running) + list(self.scheduler.waiting), error)
            self.scheduler.running.clear()
            self.scheduler.waiting.clear()
        self.emit(ended)
        self.runner.reset()

    def generate(self, prompt_ids: list[int], params: SamplingParams, adapter: Adapter | None = None) -> Sequence:
        """Run one request to the end on this thread (tests, benchmarks, the single-request path)."""
        seq = self.submit(Sequence(list(prompt_ids), params, adapter))
        while not seq.finished:
            self.step()
        return seq

    def _deliver(self, out: StepOutput) -> Delivery | None:
        """Record the token on its request; what its consumer is to be told, if it has one."""
        seq = out.seq
        if seq.aborted or seq.finished:
            return None
        now = time.monotonic()
        if seq.first_token_time is None:
            seq.first_token_time = now
        seq.output_ids.append(out.token_id)
        seq.logprobs.append(out.logprob)
        if seq.constraint is not None:  # its grammar takes the token (ValueError: it alone ends)
            seq.constraint.advance(out.token_id)
        text = seq.detokenizer.step(out.token_id) if seq.detokenizer else ""
        seq.text += text
        seq.finish_reason = self._finish_reason(seq, out.token_id, len(text))
        if seq.finished:
            if seq.detokenizer:  # a character left incomplete at the end: as the full decode shows it
                tail = seq.detokenizer.flush()
                text, seq.text = text + tail, seq.text + tail
            seq.finish_time = now
            self.stats["requests_finished"] += 1
        if seq.on_token is None:
            return None
        return seq, TokenEvent(out.token_id, text, out.logprob, out.token_id in self.special_ids, seq.finish_reason,
                               out.top)

    def _finish_reason(self, seq: Sequence, token_id: int, new_chars: int) -> FinishReason | None:
        if len(seq.output_ids) < seq.params.min_tokens:  # as vLLM: no stop of any kind before min_tokens
            return None
        if token_id in self.eos_ids and not seq.params.ignore_eos:
            return FinishReason.EOS
        if token_id in seq.params.stop_token_ids:
            return FinishReason.STOP
        if seq.constraint is not None and seq.constraint.complete:  # the grammar takes nothing more
            return FinishReason.EOS
        for stop in seq.params.stop:
            if stop in seq.text[-(len(stop) + new_chars):]:
                return FinishReason.STOP
        if len(seq.output_ids) >= seq.params.max_new_tokens:
            return FinishReason.LENGTH
        return None


Delivery = tuple[Sequence, "TokenEvent | Exception"]  # a request's token, or the error that ended it


def _abort(seqs: list[Sequence], error: Exception) -> list[Delivery]:
    """Mark the requests not yet ended as aborted; the error to tell each one's consumer."""
    ended = []
    for seq in (member for s in seqs for member in s.group):
        if not seq.finished and not seq.aborted:
            seq.aborted = True
            if seq.on_token:
                ended.append((seq, error))
    return ended


def _call_back(deliveries: list[Delivery]) -> None:
    """Tell each consumer its event; one whose callback raises is logged, and the others are told."""
    for seq, event in deliveries:
        try:
            seq.on_token(seq, event)
        except Exception:
            log.exception("the consumer of request %d failed on its event", seq.id)


def _vocab_size(model) -> int:
    head = model.get_output_embeddings()
    return getattr(head, "out_features", None) or model.config.get_text_config().vocab_size


def _eos_ids(model, tokenizer) -> set[int]:
    ids = set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (configured, tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(v for v in value if isinstance(v, int))
    return ids
