# pcgpt server image: CPU by default, CUDA by build argument.
#
#   docker build -t pcgpt .                                   # CPU (PyTorch's CPU wheel)
#   docker build -t pcgpt:cuda \
#     --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu124 .   # CUDA: any CUDA wheel
#                             # index PyTorch publishes for TORCH_VERSION (cu124, cu126, cu128, ...)
#   docker run --gpus all -p 8000:8000 pcgpt:cuda             # needs the NVIDIA container toolkit
#
# The CUDA wheels carry their own CUDA runtime, so the same slim base serves both; the server
# picks CUDA when it sees a GPU (PCGPT_DEVICE=auto) and bf16 where the GPU has it.
#
# No Docker engine runs on the development machines: tests/test_deploy.py reads this file and runs
# its COPY and RUN steps as plain commands into a fresh virtual environment (torch from the local
# wheel, the same version, instead of TORCH_INDEX), then starts the CMD and runs the HEALTHCHECK.
# Keep the steps plain (one command per RUN) so that test can replay them.
FROM python:3.11-slim

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH

RUN python -m venv /opt/venv
# PyTorch first, from the index the build argument names, so `pip install .` keeps it
RUN pip install torch==${TORCH_VERSION} --index-url ${TORCH_INDEX}

WORKDIR /app
# only what serving needs: the package, with its shipped checkpoints (no tests, data, bench)
COPY pyproject.toml README.md ./
COPY pcgpt ./pcgpt
RUN pip install .

RUN useradd --system --uid 10001 --home-dir /app --shell /usr/sbin/nologin pcgpt
USER 10001

EXPOSE 8000
# /health is liveness: it fails only once a model's engine has used up its restarts
# (--max-engine-restarts), when restarting the container is the cure. /ready is readiness: 503 while
# any engine is down or being restarted (a load balancer's or Kubernetes' readinessProbe).
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4).status == 200 else 1)"]
CMD ["pcgpt", "serve", "--host", "0.0.0.0", "--port", "8000"]
