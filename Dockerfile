# mtls-sidecar container image.
#   docker build -t mtls-sidecar .
#   docker run --rm -v $PWD/sidecar.yaml:/etc/mtls-sidecar/sidecar.yaml:ro \
#              -v $PWD/certs:/etc/mtls-sidecar/certs:ro mtls-sidecar

FROM python:3.11.10-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY sidecar ./sidecar
RUN pip wheel --no-cache-dir --wheel-dir /wheels '.[speed]'

FROM python:3.11.10-slim-bookworm
LABEL org.opencontainers.image.title="mtls-sidecar" \
      org.opencontainers.image.description="Local mutual-TLS sidecar proxy for SAP SuccessFactors" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links /wheels mtls-sidecar uvloop \
    && rm -rf /wheels \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin sidecar
USER 10001:10001
ENV PYTHONUNBUFFERED=1
EXPOSE 8080
HEALTHCHECK --interval=15s --timeout=5s --start-period=10s --retries=3 \
    CMD ["mtls-sidecar", "healthcheck", "--url", "http://127.0.0.1:8080/-/ready"]
ENTRYPOINT ["mtls-sidecar"]
CMD ["run", "-c", "/etc/mtls-sidecar/sidecar.yaml"]
