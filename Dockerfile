# `classify serve` in a container: slim Python, CPU torch by default, a non-root user, the run folder as a volume.
#
#   docker build -t atelier-serve .
#   docker run --rm -p 8000:8000 -v "$PWD/runs/model:/model:ro" atelier-serve
#
# CUDA: build with a CUDA wheel index and run with the GPU, e.g.
#   docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 -t atelier-serve:cuda .
#   docker run --rm --gpus all -p 8000:8000 -v "$PWD/runs/model:/model:ro" atelier-serve:cuda
# /similar reads the run's split table, workspace cache and training images at the paths model.json records: mount
# those read-only at the same paths (e.g. -v /data/ws:/data/ws:ro -v /data/raw:/data/raw:ro) to have it.
ARG PYTHON_VERSION=3.11
FROM python:${PYTHON_VERSION}-slim

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/home/atelier \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
# torch first, from the chosen wheel index, so that installing atelier does not pull the (large) CUDA build
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX}" \
        "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}"
COPY pyproject.toml README.md ./
COPY curator ./curator
COPY classify ./classify
# atelier itself: its dependencies are the ranges pyproject.toml gives (DL3013 asks for pins of named packages)
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".[serve]" "swagger-ui-bundle==1.1.0" \
    && useradd --no-log-init --create-home --uid 1000 atelier
USER 1000:1000

VOLUME ["/model"]
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4).status != 200)"]
ENTRYPOINT ["classify", "serve", "--model", "/model", "--host", "0.0.0.0"]
CMD ["--port", "8000"]
