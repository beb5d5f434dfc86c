# syntax=docker/dockerfile:1
# The scoring service as an image, in two flavours:
#
#   docker build --target cpu -t anomaly-scores:cpu .   python:3.11-slim, onnxruntime backend (default)
#   docker build --target gpu -t anomaly-scores:gpu .   CUDA base image, torch backend on the GPU
#
# Each flavour has a builder stage that installs the project into a venv at /opt/venv, through
# scripts/install_runtime.sh (the same script scripts/build_cpu_runtime.sh runs without Docker), and
# a runtime stage that copies only that venv and the model: no compiler, no pip cache, no source.
#
# The model: models/ is baked in at /app/models and ANOMALY_MODEL_PATH=/app/models/default. To serve
# another bundle without rebuilding, mount it read-only and point the variable at it, e.g.
#   docker run -v "$PWD/my-model:/models/my-model:ro" -e ANOMALY_MODEL_PATH=/models/my-model ...
# (or mount over /app/models/default itself). Every ANOMALY_* setting of the README applies.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:12.4.1-runtime-ubuntu22.04

############################## CPU ##############################

FROM ${PYTHON_IMAGE} AS cpu-builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY scripts/install_runtime.sh scripts/install_runtime.sh
COPY pyproject.toml README.md ./
COPY app app
# `.[serve]`: the onnxruntime backend scores every method from the bundle's ONNX graphs, so the
# CPU image carries no PyTorch. --build-arg CPU_TORCH=1 adds torch's CPU-only build (from the
# PyTorch CPU index), for bundles written before every method had a graph.
ARG TORCH_SPEC=torch==2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG CPU_TORCH=0
RUN TORCH_SPEC="${TORCH_SPEC}" TORCH_INDEX_URL="${TORCH_INDEX_URL}" WITH_TORCH="${CPU_TORCH}" \
    bash scripts/install_runtime.sh cpu /opt/venv /src

FROM ${PYTHON_IMAGE} AS cpu
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    ANOMALY_MODEL_PATH=/app/models/default \
    ANOMALY_BACKEND=onnx \
    ANOMALY_DEVICE=cpu
RUN groupadd --system --gid 10001 anomaly \
    && useradd --system --uid 10001 --gid anomaly --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin anomaly
COPY --from=cpu-builder /opt/venv /opt/venv
# Owned by root and read-only to the service user: the process cannot alter the model it serves.
COPY models /app/models
WORKDIR /app
USER 10001:10001
EXPOSE 8000
# Healthy once the model is loaded and warmed up (/readyz 200); no curl in the image, so urllib.
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=3).status == 200 else 1)"]
# uvicorn shuts down gracefully on SIGTERM (requests in flight get ANOMALY_SHUTDOWN_GRACE_S, 30 s by
# default) and the serve command exits 0: give `docker stop` a longer timeout than that.
STOPSIGNAL SIGTERM
ENTRYPOINT ["anomaly-scores", "serve", "--host", "0.0.0.0", "--port", "8000"]

############################## GPU ##############################

FROM ${CUDA_IMAGE} AS gpu-base
ENV DEBIAN_FRONTEND=noninteractive
# Ubuntu 22.04's python3.11; the venv made from it in gpu-builder runs unchanged in gpu.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/*

FROM gpu-base AS gpu-builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY scripts/install_runtime.sh scripts/install_runtime.sh
COPY pyproject.toml README.md ./
COPY app app
# `.[serve,train]` with PyPI's torch: its Linux wheels are CUDA builds that bring their own CUDA
# runtime libraries (nvidia-* wheels); the host needs an NVIDIA driver recent enough for that CUDA.
# Another CUDA build: --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cuXXX
ARG TORCH_SPEC=torch==2.13.0
ARG TORCH_INDEX_URL=
RUN TORCH_SPEC="${TORCH_SPEC}" TORCH_INDEX_URL="${TORCH_INDEX_URL}" PYTHON=python3.11 \
    bash scripts/install_runtime.sh gpu /opt/venv /src

FROM gpu-base AS gpu
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    ANOMALY_MODEL_PATH=/app/models/default \
    ANOMALY_BACKEND=torch \
    ANOMALY_DEVICE=cuda \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
RUN groupadd --system --gid 10001 anomaly \
    && useradd --system --uid 10001 --gid anomaly --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin anomaly
COPY --from=gpu-builder /opt/venv /opt/venv
COPY models /app/models
WORKDIR /app
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=3).status == 200 else 1)"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["anomaly-scores", "serve", "--host", "0.0.0.0", "--port", "8000"]

# `docker build .` without --target builds the CPU image.
FROM cpu
