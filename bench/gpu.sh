#!/usr/bin/env bash
# bench/gpu.py on a lent GPU machine, whose python has torch (CUDA), transformers, tiktoken, httpx,
# safetensors, numpy, tqdm, prometheus-client, matplotlib and pytest, but not the server's other
# packages. On this machine first:
#   ../shared/tools/gpu-wheels.sh            # the missing wheels into .whl/ (PyPI)
#   echo /.whl/ >> .git/info/exclude
# then run `bash bench/gpu.sh` there with .whl carried; it writes bench/results/gpu.json and
# bench/results/gpu_profile.txt. Extra arguments go to bench/gpu.py (e.g. --only decode).
set -euo pipefail
cd "$(dirname "$0")/.."
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
exec python3 -m bench.gpu "$@"
