"""`python -m tests.integration.fault_server --fail-rate P --fault-log PATH <server flags>`: the
real server, with `ModelRunner._forward` made to raise `RuntimeError("injected fault")` with
probability P (seeded) in steps that admit newcomers, so that the engine's containment (rerun the
step without its newcomers, fail them alone) runs under load. Production code is untouched.

After every fault the log (JSON) is rewritten: the number of faults and, per fault, the prompt ids
of the step's newcomers (whether each was already aborted) and how many rows were running.
Only steps with a served request among the newcomers (one with a consumer: `on_token`) can fail,
so the start-up self-check is never hit.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import threading

from server.engine import model_runner
import server.__main__ as server_main


def install(fail_rate: float, seed: int, log_path: str | None) -> None:
    original = model_runner.ModelRunner._forward
    rng = random.Random(seed)
    lock = threading.Lock()
    faults: list[dict] = []

    def write_log() -> None:
        if log_path:
            tmp = f"{log_path}.tmp"
            with open(tmp, "w") as f:
                json.dump({"faults": len(faults), "fail_rate": fail_rate, "seed": seed, "steps": faults}, f)
            os.replace(tmp, log_path)

    def faulty_forward(self, batch, tokens, sampling):
        newcomers = [seq for seq in batch if seq.computed == 0]  # admitted in this step: none of their keys yet
        served = any(seq.on_token is not None for seq in newcomers)
        if served:
            with lock:
                fail = rng.random() < fail_rate
                after = rng.random() < 0.5  # raise before the model runs, or after it wrote this step's keys/values
        if not served or not fail:
            return original(self, batch, tokens, sampling)
        if after:
            original(self, batch, tokens, sampling)
            for seq, ids in zip(batch, tokens):  # as a forward that raised midway: lengths not advanced
                seq.segment.length -= len(ids)
        with lock:
            faults.append({
                "running": len(batch) - len(newcomers),
                "newcomers": [{"prompt_ids": seq.prompt_ids, "aborted": bool(seq.aborted)} for seq in newcomers],
                "after_forward": after,
            })
            write_log()
        raise RuntimeError("injected fault")

    model_runner.ModelRunner._forward = faulty_forward
    write_log()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fail-rate", type=float, default=0.05)
    parser.add_argument("--fault-seed", type=int, default=0)
    parser.add_argument("--fault-log", default=None)
    args, rest = parser.parse_known_args(argv)
    install(args.fail_rate, args.fault_seed, args.fault_log)
    server_main.main(rest)


if __name__ == "__main__":
    main()
