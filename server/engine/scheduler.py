"""Which requests run in the next step: first come, first served, within the batch limits. No tensors.

A step decodes every running request once and admits waiting requests in arrival order while
the batch has room and the prefill token budget (prompt plus virtual tokens) lasts. The
oldest waiting request is always admitted first, and alone if it exceeds the budget by itself,
so nothing waits forever behind later arrivals.
"""

from __future__ import annotations

from collections import deque

from .model_runner import ScheduledStep
from .request import FinishReason, Overloaded, Sequence


class Scheduler:
    def __init__(self, max_running: int, max_waiting: int, max_prefill_tokens: int):
        self.max_running = max_running
        self.max_waiting = max_waiting
        self.max_prefill_tokens = max_prefill_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def __len__(self) -> int:
        return len(self.waiting) + len(self.running)

    def add(self, seq: Sequence) -> None:
        if len(self.waiting) >= self.max_waiting:
            raise Overloaded(f"the queue is full ({self.max_waiting} requests waiting); retry later")
        self.waiting.append(seq)

    def schedule(self) -> ScheduledStep:
        release = [s for s in self.running if s.finished or s.aborted]
        for s in release:
            if not s.finished:
                s.finish_reason = FinishReason.ABORT
        if release:
            self.running = [s for s in self.running if not (s.finished or s.aborted)]
        if any(s.aborted for s in self.waiting):  # released too, though they hold no KV yet
            for s in self.waiting:
                if s.aborted:
                    s.finish_reason = FinishReason.ABORT
                    release.append(s)
            self.waiting = deque(s for s in self.waiting if not s.aborted)
        step = ScheduledStep(release=release, decode=bool(self.running))
        budget = self.max_prefill_tokens
        while self.waiting and len(self.running) + len(step.prefill) < self.max_running:
            cost = self.waiting[0].prefill_tokens
            if step.prefill and cost > budget:
                break
            step.prefill.append(self.waiting.popleft())
            budget -= cost
        self.running += step.prefill
        return step
