# syntax=docker/dockerfile:1
# mtls-sidecar container image.
#
#   docker build -t mtls-sidecar:0.1.0 .
#   docker run --rm --read-only \
#     -v "$PWD/sidecar.yaml:/etc/mtls-sidecar/sidecar.yaml:ro" \
#     -v "$PWD/certs:/etc/mtls-sidecar/certs:ro" mtls-sidecar:0.1.0
#
# The config is read from /etc/mtls-sidecar/sidecar.yaml; paths in it are
# relative to that file, so certificates mounted at /etc/mtls-sidecar/certs
# are `certs/...` there. Logs are JSON lines on stderr. The process runs as
# uid/gid 10001: key files mounted in must be readable by that uid.
# No key material is ever copied into the image (.dockerignore keeps the
# build context to pyproject.toml, README.md and sidecar/).

ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm

# ---------------------------------------------------------------- build stage
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY sidecar ./sidecar
# Every dependency (cryptography, aiohttp, uvloop) comes as a binary wheel:
# no compiler is needed here, and none reaches the final image.
RUN python -m venv /opt/mtls-sidecar \
    && /opt/mtls-sidecar/bin/pip install --only-binary=:all: --no-binary=mtls-sidecar ".[speed]" \
    && /opt/mtls-sidecar/bin/python -m compileall -q /opt/mtls-sidecar \
    && /opt/mtls-sidecar/bin/mtls-sidecar --version

# ---------------------------------------------------------------- final stage
FROM ${PYTHON_IMAGE}
ARG PYTHON_IMAGE
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown
LABEL org.opencontainers.image.title="mtls-sidecar" \
      org.opencontainers.image.description="Local mutual-TLS sidecar proxy for SAP SuccessFactors and other client-certificate APIs" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="${PYTHON_IMAGE}"

RUN groupadd --system --gid 10001 sidecar \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin sidecar \
    && mkdir -p /etc/mtls-sidecar

COPY --from=build /opt/mtls-sidecar /opt/mtls-sidecar

ENV PATH="/opt/mtls-sidecar/bin:${PATH}" \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
WORKDIR /etc/mtls-sidecar
USER 10001:10001
EXPOSE 8080
STOPSIGNAL SIGTERM
# The default route listens on 127.0.0.1:8080; a config that listens elsewhere
# needs `--health-cmd` (docker run) or a healthcheck override (compose) to match.
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["mtls-sidecar", "healthcheck", "--url", "http://127.0.0.1:8080/-/ready"]
ENTRYPOINT ["mtls-sidecar"]
CMD ["run", "-c", "/etc/mtls-sidecar/sidecar.yaml", "--log-format", "json"]
