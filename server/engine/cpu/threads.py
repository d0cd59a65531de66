"""How many torch threads the engine runs, and on which CPUs (`--cpu-threads`).

Settings:
  auto   torch's default count, but no more than the CPUs this process may run on (its affinity:
         taskset, a cpuset) nor than its cgroup's CPU quota (a container's `--cpus`, a Kubernetes
         CPU limit), which torch does not read: a pod limited to 4 CPUs on a 64-core host would
         otherwise run 32 threads in 4 CPUs' time, and every thread's share of a step waits for
         the quota to refill. From RESERVE_FROM threads up, one fewer, so that a CPU is left to
         the event loop (vLLM's CPU backend also keeps one back for its front end)
  N      N threads
  LIST   one thread per CPU listed ("8-15", "0,2,4,6", "3-3"), the engine's threads confined to
         them (the HTTP side stays free to run anywhere): for several servers on one machine

Why a CPU for the event loop, and only on many cores (bench/README.md, "Threads and cores"): the
loop's Python for a step's tokens (some 3-6 ms a step at 64 streams) runs best beside the layers,
which needs a CPU no kernel thread fills; `ThreadPlan.spare` tells `engine.AsyncEngine` whether
there is one (it says why). That cost is fixed while a step shortens with more threads, so giving
up a CPU pays on many cores only: on an H200 host's 16 cores (bench model, 64 streams) HTTP ran at
0.88-0.99 of in-process with 15 threads, 0.78-0.97 with 16. On 4 cores a CPU left idle cost more
than it saved (0.78-0.86 against 0.89-1.05), and binding each thread to one CPU more still
(0.61-0.71), so no setting binds.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

CGROUP = Path("/sys/fs/cgroup")
RESERVE_FROM = 16  # auto leaves a CPU to the event loop when it would run this many threads on every CPU


@dataclass(frozen=True)
class ThreadPlan:
    threads: int  # torch's intra-op threads on the engine thread
    cpus: tuple[int, ...] | None = None  # the CPUs they are confined to; None: any the process may use
    why: str = ""  # for the log
    spare: bool = False  # whether the process has CPU beyond these threads, for the event loop

    def describe(self) -> str:
        where = f"confined to CPUs {format_cpus(self.cpus)}" if self.cpus else "on any CPU"
        loop = "; CPU left for the event loop" if self.spare else ""
        return f"{self.threads} torch threads {where} ({self.why}){loop}"

    def info(self) -> dict:
        """For /info; `openmp_spin_count`: how long OpenMP's idle workers spin (server/openmp.py), None: libgomp's default."""
        return {"threads": self.threads, "cpus": list(self.cpus) if self.cpus else None, "spare": self.spare,
                "openmp_spin_count": os.environ.get("GOMP_SPINCOUNT")}


def plan_threads(setting: str | int | list[int], cpus: list[int] | None = None,
                 quota: float | None | Literal["read"] = "read", default: int | None = None) -> ThreadPlan:
    """The plan for a parsed `--cpu-threads` (config.parse_cpu_threads). cpus: the CPUs this process
    may use (default: its affinity); quota: its cgroup's CPU quota in CPUs (None: unlimited; default:
    read); default: torch's thread count. ValueError for a CPU list naming a CPU the process may
    not use."""
    cpus = sorted(os.sched_getaffinity(0)) if cpus is None else cpus
    quota = cgroup_cpu_quota() if quota == "read" else quota
    capacity = min(len(cpus), quota if quota is not None else math.inf)  # CPUs' worth the process may run
    if setting == "auto":
        default = torch.get_num_threads() if default is None else default
        limits = {"torch's default": default, "the CPUs available": len(cpus)}
        if quota is not None:
            limits["the cgroup's CPU quota"] = max(1, math.floor(quota))
        threads = min(limits.values())
        why = "auto: the least of " + ", ".join(f"{k} {v}" for k, v in limits.items())
        if threads >= RESERVE_FROM and capacity - threads < 1:
            threads -= 1
            why += f", less one CPU for the event loop (from {RESERVE_FROM} threads)"
        return ThreadPlan(threads, why=why, spare=capacity - threads >= 1)
    if isinstance(setting, int):
        return ThreadPlan(setting, why="--cpu-threads", spare=capacity - setting >= 1)
    foreign = sorted(set(setting) - set(cpus))
    if foreign:
        raise ValueError(f"CPUs {format_cpus(foreign)} are not available to this process "
                         f"(it may use {format_cpus(cpus)})")
    return ThreadPlan(len(setting), tuple(setting), why="--cpu-threads",
                      spare=len(cpus) > len(setting) and capacity - len(setting) >= 1)


def cgroup_cpu_quota(root: Path = CGROUP, membership: str | None = None) -> float | None:
    """This process's CPU quota in CPUs (2.5: 250 ms per 100 ms), from cgroup v2's cpu.max or v1's
    cpu.cfs_quota_us; None when unlimited or unreadable. membership: /proc/self/cgroup's text."""
    if membership is None:
        try:
            membership = Path("/proc/self/cgroup").read_text()
        except OSError:
            membership = ""
    paths = {"v2": "/", "v1": "/"}
    for line in membership.splitlines():
        if line.count(":") < 2:
            continue
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            paths["v2"] = path
        elif "cpu" in controllers.split(","):
            paths["v1"] = path
    candidates = [(root / paths["v2"].lstrip("/") / "cpu.max", None), (root / "cpu.max", None)]
    for v1 in ("cpu", "cpu,cpuacct"):
        base = root / v1
        candidates += [(base / paths["v1"].lstrip("/") / "cpu.cfs_quota_us", "cpu.cfs_period_us"),
                       (base / "cpu.cfs_quota_us", "cpu.cfs_period_us")]
    for path, period_file in candidates:
        try:
            if period_file is None:  # v2: "max 100000" or "400000 100000"
                quota, period = path.read_text().split()[:2]
            else:
                quota, period = path.read_text().strip(), (path.parent / period_file).read_text().strip()
            if quota in ("max", "-1"):
                return None
            return int(quota) / int(period) if int(period) > 0 and int(quota) > 0 else None
        except (OSError, ValueError):
            continue
    return None


def format_cpus(cpus) -> str:
    """[0, 1, 2, 5] -> '0-2,5'."""
    runs: list[list[int]] = []
    for cpu in sorted(cpus):
        if runs and cpu == runs[-1][1] + 1:
            runs[-1][1] = cpu
        else:
            runs.append([cpu, cpu])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def apply(plan: ThreadPlan) -> None:
    """On the engine thread, before its first parallel op: its torch thread count and, for a
    confined plan, its CPUs, which the OpenMP workers it starts inherit."""
    if plan.cpus:
        os.sched_setaffinity(0, plan.cpus)  # 0: the calling thread
    torch.set_num_threads(plan.threads)
