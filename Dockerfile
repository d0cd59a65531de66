# syntax=docker/dockerfile:1
#
# softprompt-server image: one frozen Hugging Face causal LM serving many soft-prompt adapters.
#
#   docker build -t softprompt-server .                                  # CUDA 12.8 (default)
#   docker build -t softprompt-server:cpu --build-arg TORCH_VARIANT=cpu .  # CPU only, slim base
#
# TORCH_VARIANT picks both the PyTorch wheel index (https://download.pytorch.org/whl/<variant>)
# and the base image: cu126 / cu128 / cu129 / cu130 use the CUDA runtime image (CUDA_IMAGE),
# cpu uses a slim Python image (CPU_IMAGE). The CUDA build of torch is installed first, then
# the project with `pip install -c constraints.txt .`: every other package at the exact version of
# the lock (constraints.txt), so an image built next month runs what the tests ran. The lock's
# `torch==<TORCH_VERSION>` admits the CUDA build (2.13.0+cu128 is a 2.13.0), already installed.
# Needs BuildKit (the default builder since Docker 23): only the selected base stage is built.
#
# See docker/DEPLOY.md for running it, docker/compose.yaml and docker/softprompt.env.example.

ARG TORCH_VARIANT=cu128
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04
ARG CPU_IMAGE=python:3.12-slim-bookworm

# --- base images, one per TORCH_VARIANT ------------------------------------------------------

FROM ${CUDA_IMAGE} AS cuda-base
# The CUDA images ship no Python; Ubuntu 24.04 brings 3.12. Versions are not pinned: they are
# fixed by the pinned base image's Ubuntu release, and exact .deb pins break the build as soon
# as the archive moves to a security update.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/*

# torch wheels bundle their own CUDA libraries; the runtime image only has to match the driver.
FROM cuda-base AS base-cu126
FROM cuda-base AS base-cu128
FROM cuda-base AS base-cu129
FROM cuda-base AS base-cu130

FROM ${CPU_IMAGE} AS base-cpu
# A C++ compiler: on CPU the server builds its attention and linear kernels at start-up (about 30 s,
# server/engine/cpu/kernels.py; without g++ it falls back to slower attention and oneDNN, with a warning).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ \
    && rm -rf /var/lib/apt/lists/*

# --- builder: a virtualenv with torch and the project ----------------------------------------

# The stage name resolves to one of the base-* stages above, each of which pins its image tag.
# hadolint ignore=DL3006
FROM base-${TORCH_VARIANT} AS builder
ARG TORCH_VARIANT
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/${TORCH_VARIANT}
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH

RUN python3 -m venv /opt/venv

# Its own layer, before the sources are copied: code changes do not download torch again. Only
# torch comes from the PyTorch index (--no-deps); its dependencies (the CUDA libraries, triton,
# at the exact versions this torch build names) come from PyPI with the rest, through the lock.
RUN pip install --no-cache-dir --no-deps --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}" \
    && python -c "from importlib.metadata import version; print(version('torch'))" > /opt/venv/torch-build

WORKDIR /src
# README.md is the package's long description; the wildcard keeps the build going without one.
COPY pyproject.toml constraints.txt README.md* ./
COPY server ./server
COPY adapters ./adapters
# Not editable: the venv is copied into the runtime stage without the sources. The last check
# fails the build if resolving the project's dependencies replaced the torch build above.
RUN pip install --no-cache-dir -c constraints.txt . \
    && pip check \
    && python -c "import sys; from importlib.metadata import version; want = open('/opt/venv/torch-build').read().strip(); \
sys.exit(0 if version('torch') == want else 'pip install . replaced torch ' + want + ' by ' + version('torch'))"

# --- runtime ---------------------------------------------------------------------------------

# hadolint ignore=DL3006
FROM base-${TORCH_VARIANT} AS runtime
ARG TORCH_VARIANT

LABEL org.opencontainers.image.title="softprompt-server" \
      org.opencontainers.image.description="Serve soft-prompt adapters on one frozen Hugging Face causal LM" \
      org.opencontainers.image.licenses="Apache-2.0" \
      io.softprompt.torch-variant="${TORCH_VARIANT}"

COPY --from=builder /opt/venv /opt/venv
COPY --chmod=0755 docker/entrypoint.sh /usr/local/bin/docker-entrypoint.sh

# Non-root user 10001 (numeric below, so runAsNonRoot-style checks can verify it); the volume
# folders are created owned by it, so fresh named volumes are too.
RUN groupadd --gid 10001 softprompt \
    && useradd --uid 10001 --gid 10001 --create-home --shell /usr/sbin/nologin softprompt \
    && mkdir -p /data/adapters /data/hf-cache \
    && chown -R softprompt:softprompt /data

# Every server flag --some-flag is also read from SOFTPROMPT_SOME_FLAG (the server reads them
# itself; a flag given after the image name wins). The main ones, with the image's defaults:
#   SOFTPROMPT_MODEL            hub id or local dir of the base LM (unset: built-in demo model)
#   SOFTPROMPT_API_KEY          Bearer key for generation routes (unset: open)
#   SOFTPROMPT_ADMIN_KEY        Bearer key for adapter uploads/deletions (unset: open)
#   SOFTPROMPT_REVISION, SOFTPROMPT_MAX_BATCH_SIZE, SOFTPROMPT_MAX_WAITING, ... : see
#   docker/softprompt.env.example or `docker run --rm IMAGE --help`.
# Keep SOFTPROMPT_PORT and SOFTPROMPT_HOST in the environment (not flags): the health check
# reads them. HF_TOKEN is read by huggingface_hub for gated or private models.
ENV PATH=/opt/venv/bin:$PATH \
    VIRTUAL_ENV=/opt/venv \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HOME=/data/hf-cache \
    SOFTPROMPT_HOST=0.0.0.0 \
    SOFTPROMPT_PORT=8000 \
    SOFTPROMPT_ADAPTER_DIR=/data/adapters \
    SOFTPROMPT_DEVICE=auto \
    SOFTPROMPT_DTYPE=auto \
    SOFTPROMPT_SHUTDOWN_TIMEOUT=30 \
    SOFTPROMPT_LOG_LEVEL=info

VOLUME ["/data/adapters", "/data/hf-cache"]
WORKDIR /data
USER 10001:10001
EXPOSE 8000

# /health answers 200 once the model serves. The start period covers a first model download
# (Docker 25+ probes every 5 s during it). urllib ignores proxies here: the probe is local.
HEALTHCHECK --interval=15s --timeout=5s --start-period=10m --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as r; h = os.environ.get('SOFTPROMPT_HOST') or '127.0.0.1'; h = {'0.0.0.0': '127.0.0.1', '::': '::1'}.get(h, h); h = '[' + h + ']' if ':' in h else h; r.build_opener(r.ProxyHandler({})).open('http://%s:%s/health' % (h, os.environ.get('SOFTPROMPT_PORT') or '8000'), timeout=4)"]

# docker stop sends SIGTERM to the server itself (exec form, entrypoint execs it): it refuses
# new requests, lets running ones finish for up to SOFTPROMPT_SHUTDOWN_TIMEOUT and exits 0.
# Give `docker stop -t` / compose stop_grace_period more than that (default is only 10 s).
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/docker-entrypoint.sh"]
CMD []
