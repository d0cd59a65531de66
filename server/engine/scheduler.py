"""Which requests run in the next step, within the batch limits and the KV budget. No tensors.

Every step, each running request either decodes (feeds back its last token) or computes its next
chunk of prompt: a long prompt is prefilled over several steps, at most `max_prefill_tokens`
prompt tokens a step, alongside the decodes, so running streams keep their pace. Waiting requests
are admitted in arrival order while the batch has room, the prefill budget lasts, and the pool has
free slots for the newcomer's prompt and first growth, and for its adapter's prefix unless a running
request already holds that (`kv_cache.Ledger`: a shared prefix is counted once); the oldest is
never passed over.

When the running requests' growth does not fit in the pool, the most recently admitted are
preempted: their KV is freed (their prefix's too, when no other running request reads it) and
they go back to the front of the queue, to compute their prompt and what they had generated
again when readmitted (recompute, as vLLM does). Their tokens, sampler state and stream are
kept, so the output is the same as without the preemption.

A request asked for several answers (n, best_of) is admitted with its siblings: the batch must have
room for all of them and the pool slots for each one's segment, taken at admission; it computes the
prompt alone, and its siblings join the running requests, right after it, at the step that forks
them from it (`adopt`). Until then it counts as its whole group, for the batch and for preemption.
"""

from __future__ import annotations

from collections import deque

from .kv_cache import KVPool, Ledger, growth
from .model_runner import ScheduledStep
from .request import FinishReason, Overloaded, Sequence


class Scheduler:
    def __init__(self, max_running: int, max_waiting: int, max_prefill_tokens: int, pool: KVPool):
        """pool: read for its size only; the runner allocates."""
        self.max_running = max_running
        self.max_waiting = max_waiting
        self.max_prefill_tokens = max_prefill_tokens
        self.pool = pool
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order
        self.preemptions = 0

    def __len__(self) -> int:
        return len(self.waiting) + len(self.running)

    def add(self, seq: Sequence) -> None:
        if len(self.waiting) >= self.max_waiting:
            raise Overloaded(f"the queue is full ({self.max_waiting} requests waiting); retry later")
        self.waiting.append(seq)

    def schedule(self) -> ScheduledStep:
        step = ScheduledStep(release=self._ended())
        ledger = Ledger(self.pool.slots - self.pool.reserved, self.running)
        ledger.free -= self._preempt_for_growth(step, ledger)
        occupied = len(self.running) + sum(len(s.siblings) for s in self.running)  # siblings not yet forked count
        budget = self.max_prefill_tokens
        decoding = set(step.decode)
        for seq in self.running:
            if seq in decoding:
                continue
            n = min(seq.pending, budget)
            if n == 0:
                break
            step.prefill.append((seq, n))
            budget -= n
        while self.waiting and not step.preempted and budget > 0:
            seq = self.waiting[0]
            if ledger.admission(seq) > ledger.free or occupied + len(seq.group) > self.max_running:
                break
            ledger.admit(seq)
            occupied += len(seq.group)
            self.running.append(self.waiting.popleft())
            n = min(seq.pending, budget)
            step.prefill.append((seq, n))
            budget -= n
        return step

    def adopt(self, forks: list[tuple[Sequence, list[Sequence]]]) -> None:
        """The siblings a step forked (`ModelRunner.forks`) join the running requests, right after the
        request they were forked from."""
        for seq, siblings in forks:
            at = self.running.index(seq) + 1 if seq in self.running else len(self.running)
            self.running[at:at] = siblings

    def _ended(self) -> list[Sequence]:
        """Take finished and aborted requests out of the queues; they are the step's releases."""
        ended = [s for s in self.running if s.finished or s.aborted]
        if ended:
            self.running = [s for s in self.running if not (s.finished or s.aborted)]
        if any(s.aborted for s in self.waiting):
            ended += [s for s in self.waiting if s.aborted]
            self.waiting = deque(s for s in self.waiting if not s.aborted)
        for s in ended:
            for member in s.group:  # siblings not forked end with it (their KV is released with its own)
                if not member.finished:
                    member.finish_reason = FinishReason.ABORT
        return ended

    def _preempt_for_growth(self, step: ScheduledStep, ledger: Ledger) -> int:
        """Choose the decoding requests (into step.decode), preempting the most recently admitted
        until their growth fits in `ledger.free`. Returns the slots the growth takes."""
        decoding = {s: growth(s, s.segment) for s in self.running if s.output_ids and s.pending == 1}
        need = sum(decoding.values())
        while need > ledger.free and len(self.running) > 1:
            victim = self.running.pop()
            ledger.drop(victim)
            need -= decoding.pop(victim, 0)
            victim.preemptions += 1
            self.preemptions += 1
            step.release.append(victim)
            step.preempted.append(victim)
            self.waiting.appendleft(victim)  # the earlier admitted ends up in front
        step.decode = [s for s in self.running if s in decoding]
        return need
