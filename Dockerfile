# syntax=docker/dockerfile:1
#
# prefixserve: one frozen base model, many PEFT prefix-tuning adapters, over HTTP.
#
#   CUDA (default):  docker build -t prefixserve .
#   CPU only:        docker build -t prefixserve:cpu \
#                      --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu .
#
#   docker run --gpus all -p 8000:8000 --stop-timeout 40 \
#     -v prefixserve-adapters:/data/adapters -v prefixserve-hf:/data/huggingface \
#     -v "$PWD/api-keys.json:/etc/prefixserve/api-keys.json:ro" \
#     -e PREFIXSERVE_API_KEYS_FILE=/etc/prefixserve/api-keys.json \
#     -e PREFIXSERVE_MODEL=gpt2 prefixserve
#
# The torch wheels on PyPI for Linux x86_64 are CUDA builds that bring their own CUDA runtime
# libraries, so a slim Python base is enough: the host's NVIDIA driver comes in through the
# NVIDIA Container Toolkit (`--gpus all`, or `nvidia.com/gpu` on Kubernetes). To pin one CUDA
# version, point TORCH_INDEX_URL at https://download.pytorch.org/whl/cuXYZ.
#
# Every setting is an environment variable PREFIXSERVE_<NAME> (see `prefixserve serve --help`);
# arguments after the image name are passed on as flags: `docker run ... prefixserve --max-batch-size 8`.

ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS build

# Empty: pip's default index (its Linux x86_64 torch wheels are CUDA builds).
ARG TORCH_INDEX_URL=

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH

# A virtual environment to copy whole into the runtime stage, installed from the locks CI passed on: torch
# (pinned by version in requirements/torch.txt, the build from TORCH_INDEX_URL) in its own layer, as the
# largest download that changes least often; then every other dependency, by version and sha256 hash.
WORKDIR /src
COPY requirements/torch.txt requirements/lock.txt requirements/
RUN python -m venv /opt/venv \
    && if [ -n "${TORCH_INDEX_URL}" ]; then export PIP_INDEX_URL="${TORCH_INDEX_URL}"; fi \
    && pip install --no-cache-dir -r requirements/torch.txt
RUN pip install --no-cache-dir --no-deps -r requirements/lock.txt

# Only what `pip install .` needs (.dockerignore lets nothing else in); its dependencies are all in place.
COPY . .
RUN pip install --no-cache-dir --no-deps . \
    && pip check \
    && python -c "import prefixserve, torch; print('prefixserve', prefixserve.__version__, 'torch', torch.__version__)"


FROM ${BASE_IMAGE}

LABEL org.opencontainers.image.title="prefixserve" \
      org.opencontainers.image.description="Serve PEFT prefix-tuning adapters on one frozen base model" \
      org.opencontainers.image.licenses="Apache-2.0"

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    HF_HOME=/data/huggingface \
    PREFIXSERVE_ADAPTER_DIR=/data/adapters \
    PREFIXSERVE_HOST=0.0.0.0 \
    PREFIXSERVE_PORT=8000 \
    PREFIXSERVE_JSON_LOGS=true

# A C++ compiler: the native decode attention kernel (CPU serving) is built at the first start, for the CPU
# it runs on, and cached under $HOME/.cache/prefixserve (--attention-backend; without one the portable path
# serves, as logged). tcmalloc: `prefixserve serve` restarts itself with it preloaded (--malloc auto), 3-6%
# faster decode steps. Both follow the base image's release, hence no version pins.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ libtcmalloc-minimal4 \
    && rm -rf /var/lib/apt/lists/*

RUN groupadd --system --gid 10001 prefixserve \
    && useradd --system --uid 10001 --gid prefixserve --create-home --home-dir /home/prefixserve \
       --shell /usr/sbin/nologin prefixserve \
    && mkdir -p /data/huggingface /data/adapters \
    && chown -R prefixserve:prefixserve /data

COPY --from=build /opt/venv /opt/venv

USER 10001:10001
WORKDIR /home/prefixserve

# The model cache (downloads of --model) and the adapter store (share this one between replicas).
VOLUME ["/data/huggingface", "/data/adapters"]
EXPOSE 8000

# /health: the process is up and its model is loaded. Generous start period: the first start may
# download the model.
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('PREFIXSERVE_PORT', '8000'), timeout=4)"]

# SIGTERM starts the drain: /ready turns 503, running requests get PREFIXSERVE_DRAIN_SECONDS to finish.
# Give Docker a longer stop timeout than that (docker run --stop-timeout 40, compose stop_grace_period).
STOPSIGNAL SIGTERM
ENTRYPOINT ["prefixserve", "serve"]
