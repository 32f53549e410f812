# syntax=docker/dockerfile:1
# cnnserve in two stages:
#   export  — torch (CPU wheels), trains and exports the quick model set into /models;
#   runtime — the serving install only (ONNX Runtime, gRPC; no torch), the models, a non-root user.
#
#   docker build -t cnnserve:0.1.0 .                                   # quick set, about 3 min
#   docker build -t cnnserve:0.1.0 --build-arg EXPORT_ARGS="all" .     # the whole family (hours)
#   docker run --rm -p 8001:8001 -p 8002:8002 cnnserve:0.1.0
#
# To serve models exported elsewhere, mount them over /models (docker-compose.yml shows how).
# tests/unit/test_deploy.py parses this file: keep instructions in JSON (exec) form.

ARG PYTHON_IMAGE=python:3.11-slim

# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS export

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
# torch from the CPU index first: the default index's Linux wheel pulls in gigabytes of CUDA.
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
COPY pyproject.toml README.md ./
COPY service ./service
COPY export ./export
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install ".[export]"

# Fashion-MNIST: the loader downloads it from the official URLs (and checks the published MD5s)
# when /usr/share/datasets/fashion-mnist is absent, into a cache kept between builds.
ARG EXPORT_ARGS="all --quick"
RUN --mount=type=cache,target=/root/.cache/cnnserve \
    cnnserve-export ${EXPORT_ARGS} --no-progress --model-repository /models \
    && rm -rf /models/.checkpoints \
    && cnnserve-export list --model-repository /models

# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Serving dependencies only (no extras): onnxruntime, grpcio, health, reflection, prometheus.
COPY pyproject.toml README.md /tmp/src/
COPY service /tmp/src/service
RUN pip install --no-cache-dir /tmp/src && rm -rf /tmp/src
# From /, the default --model-repository ("models") is /models too, whatever CMD is given.
WORKDIR /

COPY --chmod=0755 deploy/healthcheck.py /usr/local/bin/cnnserve-healthcheck
COPY --from=export /models /models

# A fixed numeric uid, so Kubernetes' runAsNonRoot can verify it (deploy/k8s runs as 10001).
RUN groupadd --system --gid 10001 cnnserve \
    && useradd --system --uid 10001 --gid cnnserve --no-create-home --shell /usr/sbin/nologin cnnserve
USER 10001:10001

# gRPC (our API, Open Inference Protocol, health, reflection) and Prometheus /metrics.
EXPOSE 8001 8002

HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "/usr/local/bin/cnnserve-healthcheck", "--timeout", "3"]

# SIGTERM: health turns NOT_SERVING, accepted calls get --grace-seconds, then the process exits.
STOPSIGNAL SIGTERM
ENTRYPOINT ["cnnserve", "serve"]
CMD ["--model-repository", "/models"]
