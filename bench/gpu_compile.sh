#!/usr/bin/env bash
# The compiled forward and the flash path on a GPU, in one run: bash bench/gpu_compile.sh [OUT_DIR]
# Same set-up as gpu_run.sh (wheels in .whl/ first); each part has its own time limit.
set -uo pipefail
out=${1:-/tmp/gpu-out}
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONPATH=${PYTHONPATH:-$PWD} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$out/gpu.txt"
run() { local name=$1 limit=$2; shift 2; echo "== $name: $*"; timeout "$limit" python3 "$@" 2>&1 | grep -v "^\s*$" | tee "$out/$name.txt" | tail -25; }
run ${GPU_CHECK:-check} 100 -m bench.gpu_check
run compile-bf16 ${COMPILE_LIMIT:-230} -m bench.compile_bench --device cuda --dtype bfloat16 --hidden 2048 --layers 16 --requests 128 --adapters 16 --new-tokens 128 --peft-subset 8 --repeats ${REPEATS:-1}
