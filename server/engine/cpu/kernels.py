"""The engine's C++ kernels for CPU (`csrc/`), built into one extension on first use.

`attention.cpp`: every request's attention over its pool segments, and its new keys' writes (`cpu_attention`);
`avx512.cpp`: the code written for AVX-512 (attention's rows, the bfloat16 MLP activation);
`linear.cpp`: linear layers on weights packed for AVX2 (`cpu_linear`); `rowwise.cpp`: the rotary
embedding, bfloat16 RMS norms and the MLP's activation in one pass each (`cpu_rowwise`); `forward.cpp`:
a step's layers in one call, calling the others and oneDNN's linear op (`native_decode`). They register torch ops under
`torch.ops.softprompt`, and share `common.cpp`: tasks handed out to torch's threads from a counter,
and the CPU's AVX2/FMA check.

The extension is compiled with torch.utils.cpp_extension into torch's extension cache
(TORCH_EXTENSIONS_DIR, else ~/.cache/torch_extensions; about 30 s once, then loaded from there), so it
needs a C++ compiler and ninja but no Python headers. Without them, or on any error while building
or loading it, one warning is logged and `available()` is False: attention stays one SDPA call per
request and linear layers go to oneDNN.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCES = [Path(__file__).parent / "csrc" / name
           for name in ("common.cpp", "attention.cpp", "avx512.cpp", "linear.cpp",
                        "rowwise.cpp", "forward.cpp")]
# Plain -O3, no -march: the cache may be shared by machines with different CPUs (a mounted home, a
# baked image), where a foreign instruction kills the process instead of falling back. Code that needs
# AVX2 says so per function (`target("avx2,fma")`) and is called only where the CPU has it.
# -fopenmp makes ATen's parallel_for parallel (without it the header runs serially); libgomp resolves
# to torch's own.
CFLAGS = ["-O3", "-fopenmp"]
LDFLAGS = ["-fopenmp"]

NAME = "softprompt_cpu_kernels"
_lock = threading.Lock()
_tried = False  # whether this process has tried to load the extension
_ops = None  # torch.ops.softprompt once loaded


def available() -> bool:
    """Whether the kernels are loaded; builds or loads them on the first call in this process."""
    global _tried, _ops
    if not _tried:
        with _lock:
            if not _tried:
                try:
                    _ops = _load()
                except Exception as exc:  # no compiler or ninja, a failed build, an unwritable cache
                    log.warning("CPU kernels unavailable (%s: %s); attention runs per request with SDPA and linear "
                                "layers on oneDNN", type(exc).__name__, _last_lines(str(exc)))
                _tried = True
    return _ops is not None


def ops():
    """torch.ops.softprompt; call only after `available()` said True."""
    return _ops


@contextlib.contextmanager
def held_isa(setter: str, most: str):
    """Holds an op to `most` of its instruction sets or below, through its `setter` op (`attention_isa`,
    `rowwise_isa`; tests and benchmarks run each path the CPU has); yields the one it takes, the best
    this CPU has within that. Back to the best on exit."""
    if not available():
        raise RuntimeError("the CPU kernels are not built: see the warning logged")
    hold = getattr(ops(), setter)
    try:
        yield hold(most)
    finally:
        hold("auto")


def _load():
    from torch.utils import cpp_extension

    with contextlib.suppress(ImportError):  # the ninja wheel (a dependency) when no ninja is on PATH
        import ninja

        if ninja.BIN_DIR not in os.environ.get("PATH", "").split(os.pathsep):
            os.environ["PATH"] = os.pathsep.join(filter(None, [os.environ.get("PATH"), ninja.BIN_DIR]))
    began = time.perf_counter()
    build_dir = Path(cpp_extension._get_build_directory(NAME, verbose=False))  # torch's layout of the cache
    with _only_builder(build_dir):
        cpp_extension.load(name=NAME, sources=[str(s) for s in SOURCES], extra_cflags=CFLAGS, extra_ldflags=LDFLAGS,
                           build_directory=str(build_dir), is_python_module=False)
    log.info("CPU kernels built or loaded in %.1f s", time.perf_counter() - began)
    return torch.ops.softprompt


@contextlib.contextmanager
def _only_builder(build_dir: Path):
    """While this process builds or loads the extension, no other server does, and torch's lock is
    not left over from a build that died.

    torch guards a build with a `lock` file that others poll until it goes, with no timeout: a build
    killed midway (a container stopped during its first start, with the cache on a volume) leaves
    it, and every later start waited on it for ever. Here each process first takes an flock on a
    file beside it, which the OS drops when its holder dies; holding it, a `lock` file found is a
    dead build's, and is removed. (A server of an older version, which takes no flock, building in
    the same cache at the same moment would lose its lock: a rebuild, not a hang.)"""
    import fcntl

    with open(build_dir / "softprompt.flock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # waits while another server builds; never for a dead one
        stale = build_dir / "lock"
        if stale.exists():
            log.warning("removing %s, left by a build of the CPU kernels that did not finish", stale)
            stale.unlink(missing_ok=True)
        yield


def _last_lines(text: str, n: int = 3) -> str:
    """A build error's last lines: where compilers and ninja say what went wrong."""
    return " | ".join(line.strip() for line in text.strip().splitlines()[-n:])
