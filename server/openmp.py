"""OpenMP's idle workers: how long they spin before sleeping, set before torch loads OpenMP.

torch's CPU wheels run their parallel operations on GNU OpenMP (libgomp), whose workers spin a
few milliseconds after each parallel region and then sleep. A server between requests is idle far
longer than that, and waking a sleeping worker can cost the next request much more than a step:
on the 2-core Xeon VM here the first parallel operation after an idle 100 ms took 7.3 ms (0.3
after 10 ms), and over HTTP a request's step started that late (bench model, bfloat16, a
24-token prompt after 50 ms idle: its first token at 15.5-18.0 ms by default, 11.2 with the
workers spinning longer; after 300 ms idle 19.9 against 12.6-13.2). So the server's entry points
(`python -m server`, the Ray Serve replicas) give the workers a longer spin, GOMP_SPINCOUNT 5
million iterations: about 60 ms of one CPU after the last operation, measured here. Intel's OpenMP,
which vLLM's CPU build preloads, spins 200 ms by default (KMP_BLOCKTIME). An operator's own
GOMP_SPINCOUNT or OMP_WAIT_POLICY is left as it is.

No torch import here: the variables only count if set before libgomp is loaded.
"""

from __future__ import annotations

import os

SPIN_COUNT = "5000000"


def environment() -> dict[str, str]:
    """The variables the server sets: none where the operator set OpenMP's waiting."""
    if "GOMP_SPINCOUNT" in os.environ or "OMP_WAIT_POLICY" in os.environ:
        return {}
    return {"GOMP_SPINCOUNT": SPIN_COUNT}


def apply() -> None:
    """Set them in this process; before torch is first imported, or they do nothing."""
    os.environ.update(environment())
