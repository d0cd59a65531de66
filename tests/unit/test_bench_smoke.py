"""The benchmark runs end to end on a small config (its figures are read by people, not asserted)."""

import pytest

from bench.bench_engine import main


def test_bench_quick_run_covers_every_system(capsys):
    report = main(["--quick", "--adapters", "5", "--threads", "1"])
    printed = capsys.readouterr().out
    for system in ("ours-mixed", "ours-base", "peft-seq", "peft-group", "hf-batch"):
        assert system in printed
    assert set(report["ratios"]) and report["results"]
    assert "tokens/s" in printed and "FLOP/s" in printed


def test_compile_bench_quick_run(capsys):
    from bench.compile_bench import main as compile_main

    result = compile_main(["--quick", "--threads", "1"])
    out = capsys.readouterr().out
    assert result["eager"] > 0 and result["compiled"] > 0
    assert result["same"] == 8  # float32: the compiled forward gives every request the eager tokens
    assert "compiled / eager" in out and "graph breaks" in out


def test_serving_bench_quick_run(capsys):
    """bench.serving end to end: the engine in-process, then a real server over HTTP, and where the CPU went."""
    from bench.serving import main as serving_main

    numbers = serving_main(["--requests", "4", "--new-tokens", "4", "--repeats", "1"])
    for side in ("in-process", "http"):
        assert set(numbers[side]) == {"base", "mixed"} and all(rate > 0 for rate in numbers[side].values())
    assert all(len(ratios) == 1 and ratios[0] > 0 for ratios in numbers["paired"].values())
    cpu = numbers["cpu"]  # in clock ticks (10 ms): runs this short may read 0
    assert 0 <= cpu["event loop"] <= cpu["server"] and cpu["client"] >= 0
    for spent in numbers["steps"].values():  # both sides' steps, timed: 2 workloads x 4 new tokens at least
        assert spent.steps >= 8 and 0 < spent.forward < spent.seconds
    out = capsys.readouterr().out
    assert "CPU during the HTTP runs" in out and "engine steps http:" in out


def test_serving_bench_takes_cpu_lists():
    from bench.serving import main as serving_main

    for flag, value in (("--cpus", "auto"), ("--client-cpus", "3-1")):
        with pytest.raises(SystemExit):
            serving_main([flag, value])


def test_core_split_quick_run(capsys):
    """bench.core_split end to end: the engine alone, the engine feeding an API process, and the server."""
    from bench.core_split import main as split_main

    rates = split_main(["--requests", "4", "--new-tokens", "4", "--repeats", "1"])
    assert set(rates) == {"in-process", "split", "http", "client"}
    assert all(len(r) == 1 and r[0] > 0 for r in rates.values())
    out = capsys.readouterr().out
    assert "split" in out and "engine steps split:" in out


def test_soft_prompts_bench_quick_run(capsys):
    """bench.soft_prompts end to end: inline soft prompts and the same embeddings uploaded, one server."""
    from bench.soft_prompts import main as soft_main

    result = soft_main(["--quick", "--hidden", "128", "--layers", "2"])
    assert result["texts_equal"] == result["requests"] == 8
    assert result["inline_tok_s"] > 0 and result["uploaded_tok_s"] > 0
    assert "inline / uploaded" in capsys.readouterr().out


def test_roofline_quick_run(capsys):
    from bench.roofline import main as roofline_main

    rows = roofline_main(["--device", "cpu", "--quick", "--dtype", "float32"])
    assert [r["batch"] for r in rows] == [1, 4]
    assert all(r["tokens_per_s"] > 0 and 0 < r["fraction"] for r in rows)
    assert rows[1]["kv_gb"] > rows[0]["kv_gb"] > 0  # four requests' keys read, against one's
    assert "roofline" in capsys.readouterr().out


def test_shared_prefix_bench_quick_run(capsys):
    """bench.kv_budget --shared: a prefix per adapter held and written once, against a copy per request."""
    from bench.kv_budget import main as kv_main

    out = kv_main(["--shared", "--quick", "--repeats", "1", "--threads", "1"])["shared"]
    assert out["shared"]["peak_prefix"] < out["copies"]["peak_prefix"]
    assert out["shared"]["prefix_writes"] == 4 and out["copies"]["prefix_writes"] == 8  # --quick: 8 requests, 4 adapters
    assert out["identical"] == 8
    assert "shared / copies" in capsys.readouterr().out
