"""--cpu-threads: the plan for each setting, the cgroup quota it reads, and the confinement it applies."""

from __future__ import annotations

import os
import threading

import pytest
import torch

from server.config import load_config, parse_cpu_threads
from server.engine.cpu.threads import ThreadPlan, apply, cgroup_cpu_quota, format_cpus, plan_threads

CPUS16 = list(range(16))


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


def test_auto_is_torch_default_within_the_cpus_and_the_quota():
    assert plan_threads("auto", cpus=CPUS16, quota=None, default=8).threads == 8
    plan = plan_threads("auto", cpus=[4, 5, 6, 7], quota=None, default=8)  # taskset -c 4-7
    assert (plan.threads, plan.cpus) == (4, None)
    assert "auto: the least of torch's default 8, the CPUs available 4" in plan.describe()
    plan = plan_threads("auto", cpus=CPUS16, quota=2.5, default=8)  # docker --cpus 2.5
    assert plan.threads == 2 and "the cgroup's CPU quota 2" in plan.describe()
    assert plan_threads("auto", cpus=CPUS16, quota=0.5, default=8).threads == 1


def test_auto_leaves_a_cpu_to_the_event_loop_from_16_threads():
    plan = plan_threads("auto", cpus=CPUS16, quota=None, default=16)
    assert (plan.threads, plan.spare) == (15, True)
    assert "less one CPU for the event loop" in plan.describe() and plan.info()["spare"] is True
    assert plan_threads("auto", cpus=list(range(32)), quota=16, default=32).threads == 15  # the quota is the limit
    assert plan_threads("auto", cpus=list(range(8)), quota=None, default=8).threads == 8  # too few to give one up
    plan = plan_threads("auto", cpus=list(range(32)), quota=None, default=16)  # hyper-threads: torch counts cores
    assert (plan.threads, plan.spare) == (16, True)


@pytest.mark.parametrize("setting,cpus,quota,spare", [
    ("auto", CPUS16, None, True),  # torch's default 8 of 16 CPUs
    ("auto", list(range(4)), None, False),  # 4 threads on 4 CPUs
    ("auto", CPUS16, 2.5, False),  # 2 threads in a quota of 2.5 CPUs: half a CPU is not one for the loop
    ("auto", CPUS16, 9.5, True),  # 8 threads in 9.5 CPUs
    (2, CPUS16, 2.0, False),
    (2, [0, 1, 2], None, True),
    ([0, 1], [0, 1], None, False),  # confined to every CPU there is
    ([0, 1], [0, 1, 2], None, True),
    ([0, 1], [0, 1, 2], 2.0, False),
])
def test_spare_when_the_plan_leaves_a_cpu(setting, cpus, quota, spare):
    assert plan_threads(setting, cpus=cpus, quota=quota, default=8).spare is spare


def test_a_count_and_a_list():
    plan = plan_threads(3, cpus=CPUS16, quota=None, default=8)
    assert (plan.threads, plan.cpus) == (3, None)
    plan = plan_threads([9, 3, 4], cpus=CPUS16, quota=None, default=8)
    assert (plan.threads, plan.cpus) == (3, (9, 3, 4))
    assert "confined to CPUs 3-4,9" in plan.describe()
    with pytest.raises(ValueError, match="CPUs 16-17 are not available.*0-15"):
        plan_threads([1, 16, 17], cpus=CPUS16, quota=None, default=8)


@pytest.mark.parametrize("files,membership,quota", [
    ({"cpu.max": "400000 100000\n"}, "0::/\n", 4.0),  # cgroup v2, a container's own namespace
    ({"cpu.max": "max 100000\n"}, "0::/\n", None),
    ({"kubepods/pod1/cpu.max": "150000 100000\n", "cpu.max": "max 100000"}, "0::/kubepods/pod1\n", 1.5),
    ({"cpu/cpu.cfs_quota_us": "200000\n", "cpu/cpu.cfs_period_us": "100000\n"}, "2:cpu,cpuacct:/\n", 2.0),  # v1
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, "2:cpu,cpuacct:/\n0::/\n", None),
    ({"cpu/docker/c1/cpu.cfs_quota_us": "50000", "cpu/docker/c1/cpu.cfs_period_us": "100000"},
     "4:cpu,cpuacct:/docker/c1\n", 0.5),
    ({"cpu.max": "garbage"}, "0::/\n", None),
    ({}, "", None),  # no cgroup files at all
    ({"cpu.max": "300000 100000"}, "not a cgroup line\n0::/\n", 3.0),
])
def test_cgroup_cpu_quota(tmp_path, files, membership, quota):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert cgroup_cpu_quota(tmp_path, membership) == quota


def test_this_machines_quota_reads():
    quota = cgroup_cpu_quota()
    assert quota is None or quota > 0


def test_format_cpus():
    assert format_cpus([5, 0, 1, 2, 9, 10]) == "0-2,5,9-10"
    assert format_cpus([3]) == "3"


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
    own, new = _on_a_thread(ThreadPlan(2, (cpus[-1],)))  # two threads confined to one CPU
    assert own == {cpus[-1]}
    assert new and all(c == {cpus[-1]} for c in new.values())
    assert os.sched_getaffinity(0) == set(cpus)  # this thread is untouched


def test_openmp_workers_spin_longer_unless_the_operator_chose(monkeypatch):
    """server/openmp.py: GOMP_SPINCOUNT for the server's entry points, unless OpenMP's waiting was set."""
    from server import openmp

    for name in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY"):
        monkeypatch.setenv(name, "")  # noted as it was, so that what `apply` sets is undone too
        monkeypatch.delenv(name)
    assert openmp.environment() == {"GOMP_SPINCOUNT": openmp.SPIN_COUNT}
    openmp.apply()
    assert os.environ["GOMP_SPINCOUNT"] == openmp.SPIN_COUNT and openmp.environment() == {}
    monkeypatch.delenv("GOMP_SPINCOUNT")
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    assert openmp.environment() == {}
