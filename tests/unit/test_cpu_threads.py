"""--cpu-threads: the plan for each setting, the CPU topology it reads, and the binding it applies."""

from __future__ import annotations

import os
import threading

import pytest
import torch

from server.config import load_config, parse_cpu_threads
from server.engine import cpu_kernels
from server.engine.cpu_threads import ThreadPlan, apply, format_cpus, physical_cores, plan_threads

SMT16 = list(range(16))
SMT16_CORES = [[i, i + 8] for i in range(8)]  # 8 cores, siblings numbered n and n + 8, as Linux does


@pytest.mark.parametrize("text,parsed", [("auto", "auto"), (" AUTO ", "auto"), ("3", 3), ("5-7", [5, 6, 7]),
                                         ("0,2,4", [0, 2, 4]), ("8-9, 1", [8, 9, 1]), ("4", 4)])
def test_parse(text, parsed):
    assert parse_cpu_threads(text) == parsed


@pytest.mark.parametrize("text,mention", [("0", "positive"), ("3-1", "backwards"), ("1,1", "twice"),
                                          ("1-3,2", "twice"), ("all", "CPU list"), ("-1", "CPU list"), ("", "CPU list")])
def test_parse_refuses(text, mention):
    with pytest.raises(ValueError, match=mention):
        parse_cpu_threads(text)


def test_config_refuses_a_bad_setting_before_anything_loads():
    with pytest.raises(SystemExit, match="--cpu-threads"):
        load_config(["--cpu-threads", "2-1"], environ={})
    assert load_config([], environ={"SOFTPROMPT_CPU_THREADS": "1-3"}).cpu_threads == "1-3"
    assert load_config([], environ={}).cpu_threads == "auto"


def test_auto_leaves_one_physical_core_and_confines_the_rest():
    plan = plan_threads("auto", on_cpu=True, cpus=SMT16, cores=SMT16_CORES, default=8)
    assert plan.threads == 7 and plan.cpus == (1, 2, 3, 4, 5, 6, 7) and not plan.bind
    assert "0,8 left" in plan.describe()
    plan = plan_threads("auto", on_cpu=True, cpus=[4, 5, 6, 7], cores=[[4], [5], [6], [7]], default=4)
    assert plan.threads == 3 and plan.cpus == (5, 6, 7)


@pytest.mark.parametrize("cores", [[[0], [1]], [[0, 2], [1, 3]], [[0], [1], [2]]])
def test_auto_on_few_cores_keeps_torch_default(cores):
    cpus = sorted(c for core in cores for c in core)
    plan = plan_threads("auto", on_cpu=True, cpus=cpus, cores=cores, default=len(cpus))
    assert (plan.threads, plan.cpus) == (len(cpus), None)


def test_auto_on_a_gpu_engine_keeps_torch_default():
    plan = plan_threads("auto", on_cpu=False, cpus=SMT16, cores=SMT16_CORES, default=8)
    assert (plan.threads, plan.cpus) == (8, None)


def test_a_count_and_a_list():
    plan = plan_threads(3, on_cpu=True, cpus=SMT16, default=8)
    assert (plan.threads, plan.cpus, plan.bind) == (3, None, False)
    plan = plan_threads([9, 3, 4], on_cpu=True, cpus=SMT16, default=8)
    assert (plan.threads, plan.cpus, plan.bind) == (3, (9, 3, 4), True)
    assert "bound one each to CPUs 3-4,9" in plan.describe()
    with pytest.raises(ValueError, match="CPUs 16-17 are not available.*0-15"):
        plan_threads([1, 16, 17], on_cpu=True, cpus=SMT16, default=8)


def test_format_cpus():
    assert format_cpus([5, 0, 1, 2, 9, 10]) == "0-2,5,9-10"
    assert format_cpus([3]) == "3"


def test_physical_cores_from_sysfs(tmp_path):
    def cpu(n, package, core):
        topo = tmp_path / f"cpu{n}" / "topology"
        topo.mkdir(parents=True)
        (topo / "physical_package_id").write_text(f"{package}\n")
        (topo / "core_id").write_text(f"{core}\n")

    for n in range(4):  # two packages of two cores; siblings n and n + 4
        cpu(n, n // 2, n % 2)
        cpu(n + 4, n // 2, n % 2)
    (tmp_path / "cpu8").mkdir()  # no topology: a core of its own
    assert physical_cores(list(range(9)), tmp_path) == [[0, 4], [1, 5], [2, 6], [3, 7], [8]]
    assert physical_cores([5, 1, 2], tmp_path) == [[1, 5], [2]]


def test_physical_cores_of_this_machine_cover_its_cpus():
    cpus = sorted(os.sched_getaffinity(0))
    cores = physical_cores(cpus)
    assert sorted(c for core in cores for c in core) == cpus


def _affinities() -> dict[int, set[int]]:
    """Every thread of this process and the CPUs it may run on."""
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            out[int(tid)] = os.sched_getaffinity(int(tid))
        except OSError:  # ended meanwhile
            pass
    return out


def _on_a_thread(plan) -> tuple[set[int], dict[int, set[int]]]:
    """Apply the plan on a new thread (as the engine's), run a parallel op there, and report that
    thread's CPUs and those of the threads that appeared meanwhile (its OpenMP workers)."""
    before = set(_affinities())
    seen = {}

    def run():
        apply(plan)
        torch.mm(torch.randn(512, 512), torch.randn(512, 512))  # starts the workers
        now = _affinities()
        seen.update(own=os.sched_getaffinity(0), new={t: c for t, c in now.items() if t not in before})

    t = threading.Thread(target=run)
    t.start()
    t.join()
    return seen["own"], seen["new"]


def test_a_confined_plan_confines_the_engine_thread_and_its_workers():
    cpus = sorted(os.sched_getaffinity(0))
    own, new = _on_a_thread(ThreadPlan(2, (cpus[-1],), why="test"))  # two threads confined to one CPU
    assert own == {cpus[-1]}
    assert new and all(c == {cpus[-1]} for c in new.values())
    assert os.sched_getaffinity(0) == set(cpus)  # this thread is untouched


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs")
@pytest.mark.skipif(not cpu_kernels.available(), reason="the CPU kernels bind the threads")
def test_a_cpu_list_binds_one_thread_to_each_cpu():
    cpus = sorted(os.sched_getaffinity(0))
    listed = [cpus[-1], cpus[0]]
    own, new = _on_a_thread(plan_threads(listed, on_cpu=True))
    assert own == {cpus[-1]}  # the engine thread is thread 0
    workers = [c for c in new.values() if len(c) == 1]
    assert {cpus[0]} in workers, new
