#!/usr/bin/env bash
# The GPU checks and benchmarks in one run (CI has no GPU): bash bench/gpu_run.sh [OUT_DIR] [all|compile|serving|roofline]
#   all      gpu_check, the engine benchmark in fp32 and bf16, the KV budget benchmark in bf16, and the
#            decode roofline: a ~1B Llama in bf16 at batches 1, 16, 64 and 256, as a fraction of HBM bandwidth
#   roofline gpu_check, then the decode roofline alone
#   compile  gpu_check, then the compiled forward against eager in bf16 on the larger model
#   serving  gpu_check, then the serving path (HTTP against in-process) on the host's CPUs, which are
#            more than CI's: bench.serving on all of them with --cpu-threads auto (one CPU left to the
#            event loop from 16 threads) and with a thread on every CPU, then with the client on a
#            CPU of its own, then on CPUs 0-7; 128 requests of 96 tokens (64 x 64 is over in 2 s there)
# Wheels in .whl/ (the locked transformers, peft, and for `serving` the HTTP stack) are installed first.
set -uo pipefail
out=${1:-/tmp/gpu-out}
what=${2:-all}
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONPATH=${PYTHONPATH:-$PWD} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)" | tee -a "$out/gpu.txt"
run() { local name=$1 limit=$2; shift 2; echo "== $name: $*"; timeout "$limit" python3 "$@" 2>&1 | tee "$out/$name.txt"; }
large=(--hidden 2048 --layers 16 --requests 128 --adapters 16 --new-tokens 128)
run check 150 -m bench.gpu_check
if [ "$what" = serving ]; then
  lscpu | grep -E "^(Model name|CPU\(s\)|Thread|Core|Socket|NUMA node|Flags)" | cut -c1-600 | tee "$out/cpu.txt"
  run kernels 120 -c "from server.engine.cpu import kernels as cpu_kernels; print('CPU kernels', cpu_kernels.available())"
  last=$(($(nproc) - 1))
  long=(--repeats 2 --requests 128 --new-tokens 96)
  run serving-all-auto 150 -m bench.serving "${long[@]}" --cpus "0-$last"
  run serving-all-every-cpu 150 -m bench.serving "${long[@]}" --cpus "0-$last" --server-args "--cpu-threads $((last + 1))"
  run serving-client-apart 150 -m bench.serving "${long[@]}" --cpus "0-$((last - 1))" --client-cpus "$last"
  run serving-cpus-0-7 150 -m bench.serving "${long[@]}" --cpus 0-7
  exit 0
fi
if [ "$what" = roofline ]; then
  run roofline-bf16 300 -m bench.roofline --device cuda --dtype bfloat16
  exit 0
fi
if [ "$what" = compile ]; then
  run compile-bf16 230 -m bench.compile_bench --device cuda --dtype bfloat16 "${large[@]}" --peft-subset 8 --repeats 1
  exit 0
fi
run engine-fp32 120 -m bench.bench_engine --device cuda --dtype float32
run engine-bf16 150 -m bench.bench_engine --device cuda --dtype bfloat16 "${large[@]}" --peft-subset 8
run kv-bf16 150 -m bench.kv_budget --device cuda --dtype bfloat16 "${large[@]}"
run roofline-bf16 300 -m bench.roofline --device cuda --dtype bfloat16
