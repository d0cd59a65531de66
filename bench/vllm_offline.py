"""vLLM's engine without its server, for `bench.serving --vllm-python`: run by vLLM's python, it loads
`vllm.LLM` once (its engine core in this process: VLLM_ENABLE_V1_MULTIPROCESSING=0, as ours runs
in-process) and answers each line on stdin, a JSON request, with one JSON line on stdout.

    {"prompts": [...], "max_tokens": 64}  ->  {"tokens_per_s": ..., "tokens": ...}

Greedy, `ignore_eos`, every prompt submitted at once (`LLM.generate` steps them to the end).
Argv: MODEL_DIR DTYPE MAX_MODEL_LEN. Lines vLLM logs go to stderr.
"""

import json
import os
import sys
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def main() -> None:
    from vllm import LLM, SamplingParams

    model, dtype, max_len = sys.argv[1], sys.argv[2], int(sys.argv[3])
    out, sys.stdout = sys.stdout, sys.stderr  # vLLM's own prints must not mix with the answers
    llm = LLM(model=model, dtype=dtype, max_model_len=max_len, enable_prefix_caching=False)
    out.write(json.dumps({"ready": True}) + "\n")
    out.flush()
    for line in sys.stdin:
        req = json.loads(line)
        params = SamplingParams(temperature=0, max_tokens=req["max_tokens"], ignore_eos=True)
        t = time.perf_counter()
        results = llm.generate(req["prompts"], params, use_tqdm=False)
        wall = time.perf_counter() - t
        tokens = sum(len(r.outputs[0].token_ids) for r in results)
        out.write(json.dumps({"tokens_per_s": tokens / wall, "tokens": tokens}) + "\n")
        out.flush()


if __name__ == "__main__":
    main()
