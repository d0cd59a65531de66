"""The benchmark runs end to end on a small config (its figures are read by people, not asserted)."""

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
