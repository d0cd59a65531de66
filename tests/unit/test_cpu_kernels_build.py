"""The CPU kernels' build cache: a build killed midway must not hang every later start."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from server.engine.cpu import kernels as cpu_kernels

REPO = Path(__file__).resolve().parents[2]


def test_a_dead_builds_lock_is_removed_and_the_kernels_load(tmp_path):
    if not cpu_kernels.available():
        pytest.skip("no C++ compiler here: the kernels are never built")
    from torch.utils import cpp_extension

    built = Path(cpp_extension._get_build_directory(cpu_kernels.NAME, verbose=False))
    cache = tmp_path / "extensions"
    copy = cache / cpu_kernels.NAME  # the layout under TORCH_EXTENSIONS_DIR
    shutil.copytree(built, copy, ignore=shutil.ignore_patterns("lock", "*.flock"))  # mtimes kept: no rebuild
    (copy / "lock").write_text("")  # what torch leaves when its build is killed
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(cache)}
    run = subprocess.run([sys.executable, "-c", "import logging; logging.basicConfig(); "
                          "from server.engine.cpu import kernels as cpu_kernels; print(cpu_kernels.available())"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=180)  # without the fix: for ever
    assert run.stdout.strip() == "True", run.stderr[-2000:]
    assert "left by a build of the CPU kernels that did not finish" in run.stderr
    assert not (copy / "lock").exists()
