"""Runs the frozen model over the running requests: one packed forward per step. No queues.

A step's forward holds, back to back, one token for every decoding request and the next chunk
of prompt of every prefilling one (`attention.py`). A newcomer's adapter prefix is written once into
a shared pool segment (`KVPool.acquire_prefix`), or found there when a running request on the same
adapter version brought it in, so every adapter kind, and no adapter, share one forward: the
prefix sits at positions 0..n-1, attention reads it and then the request's own segment (its
tokens at positions n..). A request samples when its chunk reaches the end of what it had to compute.

A request asked for several answers (n, best_of) computes its prompt once. Its siblings get their
segments at its admission; at the step that completes its prompt, its last logits row is sampled
once for it and once for each sibling (each with its own seed and sampler), and its keys and values
are copied into theirs (`_fork`): from the next step on they decode as requests of their own.
"""

from __future__ import annotations

import contextlib
import itertools
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from adapters import ModelSpec

from . import attention, grammar, rope
from .cpu import attention as cpu_attention, kernels as cpu_kernels, linear as cpu_linear
from .compiled import CompiledForward
from .fast_path import FastPaths
from .kv_cache import KVPool, first_capacity, growth, prefix_key
from .cuda_graphs import DecodeGraphs
from .lean_forward import LeanForward
from .request import Sequence
from .sampler import RowSampler, sample


@dataclass
class ScheduledStep:
    """What the scheduler asks the runner to do in one step."""

    release: list[Sequence] = field(default_factory=list)  # ended or preempted: free their KV segments first
    decode: list[Sequence] = field(default_factory=list)  # each feeds back its last token
    prefill: list[tuple[Sequence, int]] = field(default_factory=list)  # each computes its next n pending tokens
    preempted: list[Sequence] = field(default_factory=list)  # of `release`: requeued, to be computed again


@dataclass
class StepOutput:
    seq: Sequence  # the request this token belongs to
    token_id: int
    logprob: float  # log-probability of the token under the request's final distribution
    top: tuple[tuple[int, float], ...] | None = None  # the most likely (id, logprob) under it; None unless asked


class ModelRunner:
    def __init__(self, model, spec: ModelSpec, kv_cache_bytes: int, compiled: CompiledForward | None = None,
                 paths: FastPaths = FastPaths(), max_batch_size: int = 64):
        """kv_cache_bytes: the KV pool's size, allocated once; compiled: the packed steps' forward, when
        compiled (`compiled.py`), else the model's own; paths: the fast paths to take (`fast_path.py`);
        max_batch_size: the most requests a step decodes (the largest CUDA graph).
        Raises ValueError when a path forced on cannot run here."""
        self.model = model
        self.spec = spec
        self.max_batch_size = max_batch_size
        attention.install(model)
        self.rope = rope.install(model)  # whether its RoPE depends on the length: then computed per request
        if spec.device.type == "cpu":
            cpu_kernels.available()  # build or load the kernels now, not in the first request
        slot_bytes = KVPool.slot_bytes(spec.num_layers, spec.num_kv_heads, spec.head_dim, spec.dtype)
        self.pool = KVPool(spec.num_layers, spec.num_kv_heads, spec.head_dim, spec.device, spec.dtype,
                           slots=kv_cache_bytes // slot_bytes)
        self.graphs: DecodeGraphs | None = None
        self.use(paths, compiled)
        self.seqs: list[Sequence] = []  # the requests holding a KV segment
        self.forward_seconds = 0.0  # wall time in the model's forward calls (on CUDA: launching them)
        # Called once per forward, its inputs built and its layers about to run (with the native decode,
        # as the GIL is released for them): where the AsyncEngine may hand the last step's tokens over.
        self.on_layers: Callable[[], None] = _nothing
        self.eos_ids: frozenset[int] = frozenset()  # the model's end tokens (set by the engine): min_tokens masks them
        self.forks: list[tuple[Sequence, list[Sequence]]] = []  # the last step's: (request, the siblings forked from it)

    def use(self, paths: FastPaths, compiled: CompiledForward | None = None) -> None:
        """Take `paths`, and run steps through `compiled`, or eager when None. On CPU, eager linears run
        on packed weights (`cpu_linear`), while torch.compile needs the plain ones back. ValueError
        when a path forced on cannot run here (the runner is then on the plain path)."""
        cpu = self.spec.device.type == "cpu"
        self.paths, self.compiled = paths, compiled
        self.lean = LeanForward(self.model) if paths.enabled and LeanForward.supports(self.model) else None
        self.attention_kernels = paths.enabled and paths.attention != "sdpa"
        if self.graphs is not None:  # recorded for the paths taken before: given up with them
            self.pool.release(self.graphs.scratch)
            self.pool.reserved = 0
            self.graphs = None
        try:
            if cpu:
                cpu_linear.install(self.model, paths.linear if paths.enabled and compiled is None else "torch",
                                   merge=self.lean.siblings() if self.lean is not None else ())
                if paths.attention == "kernel" and self.attention_kernels and not cpu_kernels.available():
                    raise ValueError("the attention kernel cannot run here: the CPU kernels did not build")
            if self.lean is not None:
                self.lean.find_native(paths.native_decode if cpu else "off", self.attention_kernels)
            elif paths.enabled and paths.native_decode == "on":
                raise ValueError("the native decode needs the written-out forward, which does not take "
                                 f"{type(self.model).__name__}")
            if paths.enabled and paths.cuda_graphs != "off":
                why = DecodeGraphs.unavailable(self)
                if why and paths.cuda_graphs == "on":
                    raise ValueError(f"CUDA graphs cannot be recorded here: {why}")
                if not why:
                    self.graphs = DecodeGraphs(self, self.max_batch_size)
        except ValueError:
            self.use(FastPaths(enabled=False), compiled)
            raise

    def use_compiled(self, compiled: CompiledForward | None) -> None:
        """The same paths, compiled or eager (a failed compile falls back to eager)."""
        self.use(self.paths, compiled)

    def describe(self) -> dict:
        """The paths taken, for the start-up log and /info."""
        cpu = self.spec.device.type == "cpu"
        if self.compiled is not None:
            forward = "torch.compile of transformers' forward"
        else:
            forward = "written out (lean_forward)" if self.lean is not None else "transformers' own"
        if not self.attention_kernels:
            attend = "SDPA per request"
        elif cpu:
            attend = cpu_attention.describe() if cpu_kernels.available() else "SDPA per request"
        else:
            attend = "variable-length flash attention where it passes its check, else SDPA"
        return {
            "fast_path": "on" if self.paths.enabled else "off",
            "forward": forward,
            "linear": cpu_linear.describe(self.model) if cpu else "torch",
            "native_decode": self.lean is not None and self.lean.native is not None,
            "attention": attend,
            "cuda_graphs": self.graphs.describe() if self.graphs is not None else None,
        }

    @property
    def usable_slots(self) -> int:
        """The pool's slots requests may hold (the CUDA graphs' scratch slot aside)."""
        return self.pool.slots - self.pool.reserved

    def reset(self) -> None:
        """Drop every request (after a failed step)."""
        for seq in self.seqs:
            for member in seq.group:
                member.segment = member.shared_prefix = None
        self.pool.clear()
        self.seqs = []
        if self.graphs is not None:
            self.graphs.reset()

    def run(self, step: ScheduledStep) -> list[StepOutput]:
        """One step. If it raises (the forward, or sampling), the runner is left as it was before
        the step, released requests aside: the requests it ran keep their lengths, newcomers hold no KV."""
        self._release(step.release)
        self.forks = []
        touched = [(seq, seq.segment.length if seq.segment else None) for seq in self._scheduled(step)]
        try:
            batch, logits = self.forward(step)
            if not batch:
                return []
            forking = [seq for seq in batch if seq.siblings]  # their prompt completed now: n / best_of
            if forking:
                batch, logits = _with_siblings(batch, logits)
            outputs = self._sample(batch, logits)
        except BaseException:
            for seq, length in touched:
                if length is None:
                    self._release([seq])
                elif seq.segment is not None:
                    seq.segment.length = length
            raise
        if forking:
            self._fork(forking)
        return outputs

    @torch.inference_mode()
    def forward(self, step: ScheduledStep) -> tuple[list[Sequence], torch.Tensor | None]:
        """Release, grow, admit, then one packed forward: the requests that sample (decoding, or
        at the end of their prompt) and their last logits [rows, vocab] (None: nothing to run)."""
        self._release(step.release)
        for seq in step.decode:  # room for the token each decoding request feeds back
            extra = growth(seq, seq.segment)
            if extra:
                self.pool.extend(seq.segment, seq.segment.capacity + extra)
        for seq, _ in step.prefill:
            if seq.segment is None:
                self._admit(seq)
        chunks = [(seq, 1) for seq in step.decode] + step.prefill
        if not chunks:
            return [], None
        sampling = [i for i, (seq, n) in enumerate(chunks) if n == seq.pending]  # the rest: a prompt's inner chunk
        tokens = [seq.next_ids(n) for seq, n in chunks]
        logits = self._forward([seq for seq, _ in chunks], tokens, sampling)
        return [chunks[i][0] for i in sampling], logits

    def _scheduled(self, step: ScheduledStep) -> list[Sequence]:
        return step.decode + [seq for seq, _ in step.prefill]

    def _release(self, seqs: list[Sequence]) -> None:
        held = [seq for seq in seqs if seq.segment is not None or seq.shared_prefix is not None]
        for member in (member for seq in held for member in seq.group):
            if member.segment is not None:
                self.pool.release(member.segment)
            if member.shared_prefix is not None:
                self.pool.release_prefix(member.shared_prefix)
            member.segment = member.shared_prefix = None
        if held:
            gone = {id(seq) for seq in held}
            self.seqs = [seq for seq in self.seqs if id(seq) not in gone]

    def _admit(self, seq: Sequence) -> None:
        """A segment for the newcomer, and its adapter's shared prefix (written in if no one holds it); for
        each sibling not yet forked, a hold on that prefix and a segment, empty until then."""
        for member in seq.group:
            if member.adapter is not None:
                member.shared_prefix = self.pool.acquire_prefix(prefix_key(member), member.adapter.kv)
        seq.segment = self.pool.allocate(first_capacity(seq))
        for sibling in seq.siblings:
            sibling.segment = self.pool.allocate(first_capacity(sibling))
        for member in seq.group:
            if member.sampler is None:  # a preempted request keeps its own: its random stream goes on
                member.sampler = RowSampler(member.params, member.seed, self.spec.device, self.eos_ids)
        if seq.params.prompt_logprobs and not seq.prompt_logprobs:  # the first token has none
            seq.prompt_logprobs.append(None)
            seq.prompt_top.append(None)
        self.seqs.append(seq)

    def _fork(self, forking: list[Sequence]) -> None:
        """After a step sampled them: the siblings of each request whose prompt it completed take a copy
        of its keys and values and its prompt's log-probabilities, and run from now on (`self.forks`)."""
        for seq in forking:
            for sibling in seq.siblings:
                self.pool.fork(seq.segment, sibling.segment)
                sibling.prompt_logprobs, sibling.prompt_top = list(seq.prompt_logprobs), list(seq.prompt_top)
            self.seqs += seq.siblings
            self.forks.append((seq, seq.siblings))
            seq.siblings = []

    def _forward(self, batch: list[Sequence], tokens: list[list[int]], sampling: list[int]) -> torch.Tensor:
        """tokens: per request, the ids it adds in this forward. Returns the last logits of the
        requests indexed by `sampling` [len(sampling), vocab]. The requests that ask for their prompt's
        log-probabilities also keep the rows of their chunk's prompt tokens (`_score_prompts`)."""
        q_lens = [len(t) for t in tokens]
        segments = [seq.segment for seq in batch]
        prefixes = [seq.shared_prefix.segment if seq.shared_prefix is not None else None for seq in batch]
        prefix_lens = [0 if p is None else p.length for p in prefixes]
        done = [p + seg.length for p, seg in zip(prefix_lens, segments)]  # keys before this forward, prefix included
        kv_lens = [d + n for d, n in zip(done, q_lens)]
        ids = [t for chunk in tokens for t in chunk]
        positions = [p for d, n in zip(done, kv_lens) for p in range(d, n)]
        last_rows = list(itertools.accumulate(q_lens))
        keep = [last_rows[i] - 1 for i in sampling]
        scored = _prompt_rows(batch, last_rows, q_lens)
        keep += [row for _, row, _ in scored]
        if self.graphs is not None and self.graphs.takes(q_lens, sampling, scored):  # every request decodes
            started = time.perf_counter()
            logits = self.graphs.run(ids, positions, {
                "slots": [seg.start + seg.length for seg in segments],
                "own": [(seg.start, seg.length + 1) for seg in segments],
                "prefix": [(0, 0) if p is None else (p.start, p.length) for p in prefixes]})
            self.forward_seconds += time.perf_counter() - started
            for seg in segments:
                seg.length += 1
            return logits
        forward = self.compiled or self.lean or self.model
        if self.compiled is not None:  # padded to a CUDA graph's size (no-op without graphs): zeros, row 0
            ids += [0] * (self.compiled.pad(len(ids)) - len(ids))
            positions += [0] * (len(ids) - len(positions))
            keep += [0] * (self.compiled.pad(len(keep)) - len(keep))
        ragged = attention.RaggedStep.build(self.pool, [seg.start for seg in segments], q_lens, kv_lens,
                                            self.attention_kernels,
                                            [0 if p is None else p.start for p in prefixes], prefix_lens)
        if self.rope:  # a prompt in chunks is rotated for its whole length, as transformers rotates it alone
            ragged.rope_lens = [d + seq.pending for d, seq in zip(done, batch)]
        device = self.spec.device
        started = time.perf_counter()
        hook = {"on_layers": self.on_layers} if forward is self.lean else {}
        if not hook:  # the lean forward calls it itself, at the last moment before its layers
            self.on_layers()
        with rope.packed(ragged) if self.rope else contextlib.nullcontext():
            out = forward(
                input_ids=torch.tensor([ids], device=device),  # [1, tokens]
                position_ids=torch.tensor([positions], device=device),  # [1, tokens]
                attention_mask=attention.NO_MASK,
                ragged=ragged,
                use_cache=False,
                logits_to_keep=torch.tensor(keep, dtype=torch.long, device=device),
                **hook,
            )
        self.forward_seconds += time.perf_counter() - started
        for seg, n in zip(segments, q_lens):
            seg.length += n
        if scored:
            _score_prompts(scored, out.logits[0, len(sampling):len(sampling) + len(scored)])
        return out.logits[0, :len(sampling)]  # [sampling rows, vocab]

    @staticmethod
    def _sample(batch: list[Sequence], logits: torch.Tensor) -> list[StepOutput]:
        needs_history = any(s.sampler.needs_history for s in batch)
        history = [s.token_ids for s in batch] if needs_history else None
        outputs = [s.output_ids for s in batch] if needs_history else None
        logits = grammar.apply(logits, batch)  # structured output: disallowed tokens at -inf
        tokens, logprobs, top = sample(logits, [s.sampler for s in batch], history, outputs)
        return [StepOutput(s, t, lp, alternatives) for s, t, lp, alternatives in zip(batch, tokens, logprobs, top)]


def _nothing() -> None:
    pass


def _with_siblings(batch: list[Sequence], logits: torch.Tensor) -> tuple[list[Sequence], torch.Tensor]:
    """The sampling rows with each sibling not yet forked given its request's row: the request samples
    only at the end of its prompt, where its siblings sample their first tokens from the same logits."""
    rows = [i for i, seq in enumerate(batch) for _ in seq.group]
    return [member for seq in batch for member in seq.group], logits[torch.tensor(rows, device=logits.device)]


def _prompt_rows(batch: list[Sequence], last_rows: list[int], q_lens: list[int]) -> list[tuple[Sequence, int, int]]:
    """(request, packed row, the prompt token that row predicts) for every prompt token in this forward
    whose log-probability a request asked for and has not yet (a preempted request computing its
    prompt again has them all); nothing for the requests that did not ask."""
    scored = []
    for seq, end, n in zip(batch, last_rows, q_lens):
        if not seq.params.prompt_logprobs:
            continue
        prompt, done, computed = seq.prompt_ids, len(seq.prompt_logprobs), seq.computed
        for j in range(n):
            k = computed + j + 1  # the token row j predicts
            if done <= k < len(prompt):
                scored.append((seq, end - n + j, prompt[k]))
    return scored


def _score_prompts(scored: list[tuple[Sequence, int, int]], logits: torch.Tensor) -> None:
    """logits: the model's raw logits of the `scored` rows [rows, vocab]. Appends each prompt token's
    log-probability (log_softmax, in float32) and its request's top_logprobs alternatives."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # [rows, vocab]
    targets = torch.tensor([t for _, _, t in scored], device=logits.device)
    chosen = logprobs.gather(1, targets[:, None])[:, 0].tolist()
    k = max(seq.params.top_logprobs for seq, _, _ in scored)
    if k:
        values, indices = logprobs.topk(k, dim=-1)
        values, indices = values.tolist(), indices.tolist()
    for i, (seq, _, _) in enumerate(scored):
        seq.prompt_logprobs.append(chosen[i])
        n = seq.params.top_logprobs
        seq.prompt_top.append(tuple(zip(indices[i][:n], values[i][:n])) if n else None)
