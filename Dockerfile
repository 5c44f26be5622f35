# syntax=docker/dockerfile:1
# Two images from one file, the same code and the same torch version the tests run on (scripts/setup.sh):
#   docker build --target cpu  -t model-compression-service:cpu .    the API and CPU workers (the default target)
#   docker build --target cuda -t model-compression-service:cuda .   GPU workers (needs the NVIDIA container toolkit)
# torch's CUDA wheels bundle their CUDA runtime (the nvidia-* wheels), so both images start from the same slim Python;
# the host only needs the NVIDIA driver.
ARG PYTHON_VERSION=3.11
ARG TORCH_VERSION=2.13.0

FROM python:${PYTHON_VERSION}-slim AS base
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# The code in /app stays root-owned and read-only to the service; everything the service writes (the SQLite
# fallback, scratch under artifacts/, prometheus' multiprocess files under metrics/, the Hugging Face cache) goes to
# MCS_VAR_DIR, which the non-root user owns.
RUN useradd --create-home --uid 1000 mcs \
    && mkdir -p /var/lib/mcs \
    && chown mcs:mcs /var/lib/mcs
ENV MCS_VAR_DIR=/var/lib/mcs HF_HOME=/var/lib/mcs/huggingface
WORKDIR /app

FROM base AS torch-cpu
ARG TORCH_VERSION
RUN pip install --index-url https://download.pytorch.org/whl/cpu "torch==${TORCH_VERSION}"

FROM base AS torch-cuda
ARG TORCH_VERSION
# PyPI's Linux x86_64 torch wheel is the CUDA build; https://download.pytorch.org/whl/cu1XX picks another CUDA.
ARG TORCH_CUDA_INDEX_URL=https://pypi.org/simple
RUN pip install --index-url "${TORCH_CUDA_INDEX_URL}" "torch==${TORCH_VERSION}"

# The project on top of either torch (the build context is what .dockerignore lets through: the service's code,
# its migrations and pyproject). pyproject's torch range accepts the installed build, so pip keeps it. An editable
# install runs the code from /app, where the data files beside it (migrations, the dashboard's pages) are.
FROM torch-cuda AS cuda
COPY . .
RUN pip install -e .
USER mcs
# the import check runs as the service's user, so whatever an import creates under MCS_VAR_DIR is the user's
RUN python -c "import torch, api.main, worker.celery_app" && rm -rf /var/lib/mcs/*
EXPOSE 8000
CMD ["mcs", "worker", "--queues", "gpu", "--concurrency", "1"]

# Last, so a plain `docker build .` builds the CPU image.
FROM torch-cpu AS cpu
COPY . .
RUN pip install -e .
USER mcs
RUN python -c "import torch, api.main, worker.celery_app" && rm -rf /var/lib/mcs/*
EXPOSE 8000
CMD ["mcs", "serve", "--host", "0.0.0.0", "--port", "8000"]
