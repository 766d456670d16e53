# The sampling service for GPU hosts (NVIDIA container toolkit: docker run --gpus all ...).
#
#   docker build -t sampler-service .
#   docker run --gpus all -p 50051:50051 -p 9100:9100 sampler-service
#
# torch comes from PyPI: its Linux x86_64 wheels are CUDA builds that bundle the CUDA runtime, so
# a slim Python base is enough (the host needs only the NVIDIA driver). Expect an image of about
# 6-7 GB, almost all of it torch and its CUDA libraries. The embedded `mnist` model is inside.
# Configure with SAMPLER_* variables (see docs/service.md); SIGTERM drains for SAMPLER_GRACE_SECONDS.
FROM python:3.11-slim-bookworm

ARG TORCH_SPEC="torch==2.13.0"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    HF_HOME=/var/cache/sampler/huggingface \
    XDG_CACHE_HOME=/var/cache/sampler \
    SAMPLER_HOST=0.0.0.0 \
    SAMPLER_PORT=50051 \
    SAMPLER_METRICS_HOST=0.0.0.0 \
    SAMPLER_METRICS_PORT=9100 \
    SAMPLER_GRACE_SECONDS=30

RUN groupadd --system --gid 10001 sampler \
    && useradd --system --uid 10001 --gid 10001 --home-dir /app --shell /usr/sbin/nologin sampler \
    && mkdir -p /var/cache/sampler \
    && chown 10001:10001 /var/cache/sampler

WORKDIR /app
COPY pyproject.toml README.md ./
COPY solvers solvers
COPY models models
COPY provenance provenance
COPY sampler_service sampler_service
COPY protos protos
# The runtime and the [text] extra (transformers, tokenizers: SD / SDXL pipelines), nothing for
# benchmarks or tests: no bench/, so the two console scripts that point
# into it (sampler-bench, sampler-amed) are removed rather than left to fail. Train AMED predictors
# with sampler-amed from a checkout and mount their folder. TORCH_SPEC is pinned above (hadolint
# cannot see through the build argument).
# hadolint ignore=DL3013
RUN pip install --no-cache-dir "${TORCH_SPEC}" \
    && pip install --no-cache-dir ".[text]" \
    && rm "$(command -v sampler-bench)" "$(command -v sampler-amed)"

USER 10001:10001
EXPOSE 50051 9100
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["sh", "-c", "sampler-client --target 127.0.0.1:${SAMPLER_PORT} --timeout 4 health"]
CMD ["sampler-service", "serve"]
