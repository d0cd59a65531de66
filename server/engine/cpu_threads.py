"""Which CPUs the engine's torch threads run on (`--cpu-threads`).

On CPU the engine's torch threads and the HTTP side (the event loop: routes, SSE chunks, sockets)
share the machine. When they share every core, each step's tokens are written on a core a torch
thread wanted, and the step waits for that thread. So on machines with cores to spare, `auto`
leaves one physical core to the HTTP side and confines the engine's threads to the others, one
thread per core, as vLLM's CPU backend keeps a core for its scheduler process.

Settings:
  auto   on CPU with 4 or more physical cores: one core left, one thread per other core, the
         threads confined to those cores; otherwise (fewer cores, or a GPU engine) torch's default
         thread count, unconfined
  N      N threads, unconfined (the operating system places them)
  LIST   one thread bound to each CPU listed, in order: "1-7", "0,2,4,6", "8-15,24-31", "3-3"; for
         several servers on one machine, give each its own CPUs

`auto` confines but does not bind each thread to one CPU: two servers started on one machine
would otherwise bind their threads to the same CPUs, where they could not move apart.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

MIN_CORES_TO_LEAVE_ONE = 4  # on 2 cores, leaving one would halve the engine to save a few percent


@dataclass(frozen=True)
class ThreadPlan:
    threads: int  # torch's intra-op threads on the engine thread
    cpus: tuple[int, ...] | None  # the CPUs they are confined to; None: any the process may use
    bind: bool = False  # thread i bound to cpus[i] alone
    why: str = ""  # for the log

    def describe(self) -> str:
        where = "unconfined"
        if self.cpus:
            where = f"{'bound one each to' if self.bind else 'confined to'} CPUs {format_cpus(self.cpus)}"
        return f"{self.threads} torch threads {where} ({self.why})"


def plan_threads(setting: str | int | list[int], on_cpu: bool, cpus: list[int] | None = None,
                 cores: list[list[int]] | None = None, default: int | None = None) -> ThreadPlan:
    """The plan for a parsed `--cpu-threads` (config.parse_cpu_threads). cpus: the CPUs this process
    may use (default: its affinity); cores: those CPUs grouped by physical core (default: from sysfs);
    default: torch's thread count. ValueError for a CPU list naming a CPU the process may not use."""
    cpus = sorted(os.sched_getaffinity(0)) if cpus is None else cpus
    default = torch.get_num_threads() if default is None else default
    if setting == "auto":
        cores = physical_cores(cpus) if cores is None else cores
        if not on_cpu or len(cores) < MIN_CORES_TO_LEAVE_ONE:
            return ThreadPlan(default, None, why=f"auto: torch's default on {len(cores)} "
                              f"{'physical cores' if on_cpu else 'cores, GPU engine'}")
        # The first core is left: the lowest CPUs are where the kernel's own work tends to land.
        bound = tuple(core[0] for core in cores[1:])
        return ThreadPlan(len(bound), bound, why=f"auto: CPU {format_cpus(cores[0])} left to the HTTP side, "
                          f"one thread per other physical core of {len(cores)}")
    if isinstance(setting, int):
        return ThreadPlan(setting, None, why="--cpu-threads")
    foreign = sorted(set(setting) - set(cpus))
    if foreign:
        raise ValueError(f"CPUs {format_cpus(foreign)} are not available to this process "
                         f"(it may use {format_cpus(cpus)})")
    return ThreadPlan(len(setting), tuple(setting), bind=True, why="--cpu-threads")


def format_cpus(cpus) -> str:
    """[0, 1, 2, 5] -> '0-2,5'."""
    runs: list[list[int]] = []
    for cpu in sorted(cpus):
        if runs and cpu == runs[-1][1] + 1:
            runs[-1][1] = cpu
        else:
            runs.append([cpu, cpu])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def physical_cores(cpus: list[int], sysfs: Path = Path("/sys/devices/system/cpu")) -> list[list[int]]:
    """The CPUs grouped by physical core (hyperthread siblings together), cores ordered by their first
    CPU. A CPU whose topology cannot be read counts as a core of its own."""
    groups: dict[tuple, list[int]] = {}
    for cpu in sorted(cpus):
        try:
            topo = sysfs / f"cpu{cpu}" / "topology"
            key = (int((topo / "physical_package_id").read_text()), int((topo / "core_id").read_text()))
        except (OSError, ValueError):
            key = ("cpu", cpu)
        groups.setdefault(key, []).append(cpu)
    return sorted(groups.values(), key=lambda group: group[0])


def apply(plan: ThreadPlan) -> None:
    """On the engine thread, before its first parallel op: its torch thread count and CPUs. The
    OpenMP workers it starts inherit its CPUs; a binding plan then binds each to its own."""
    if plan.cpus:
        os.sched_setaffinity(0, plan.cpus)  # 0: the calling thread
    torch.set_num_threads(plan.threads)
    if plan.bind:
        from server.engine import cpu_kernels

        if cpu_kernels.available():
            cpu_kernels.ops().bind_threads(list(plan.cpus))
        else:
            log.warning("the CPU kernels are unavailable to bind each torch thread to one CPU: the threads stay "
                        "confined to CPUs %s", format_cpus(plan.cpus))
