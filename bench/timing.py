"""What one timed run of a system yields (`Result`), and the device barrier every clock reading sits behind."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

import torch


@dataclass
class Result:
    name: str
    requests: int
    tokens: int  # generated
    wall_s: float
    ttft_s: dict[int, float]  # request index -> time from the run's start to its first token
    outputs: dict[int, list[int]] = field(default_factory=dict)  # request index -> generated ids
    note: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s

    @property
    def mean_ttft(self) -> float:
        return statistics.mean(self.ttft_s.values())


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on CPU), so that a clock read after it counts that work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
