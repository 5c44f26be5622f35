FROM python:3.11-slim
# CPU wheels by default; the GPU worker passes the CUDA index (see docker-compose.yml).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.9.1
WORKDIR /app
RUN pip install --no-cache-dir --index-url "$TORCH_INDEX_URL" "torch==${TORCH_VERSION}"
COPY pyproject.toml README.md ./
COPY core core
COPY api api
COPY worker worker
COPY cli cli
COPY migrations migrations
COPY bench bench
COPY alembic.ini ./
RUN pip install --no-cache-dir .
RUN useradd --create-home mcs && mkdir -p /data/artifacts && chown mcs /data/artifacts
USER mcs
EXPOSE 8000
CMD ["mcs", "serve", "--host", "0.0.0.0"]
