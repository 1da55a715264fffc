# solapi-gateway: a slim, non-root image. Mount the config folder at
# /etc/solapi-gateway and the SOLAPI secret where credentials.api_secret_file says.
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY pyproject.toml requirements.lock README.md ./
COPY gateway ./gateway
# The lock pins every version; only the runtime dependencies are installed.
RUN pip install -c requirements.lock . \
 && useradd --system --no-create-home --uid 10001 gateway
COPY config /etc/solapi-gateway

USER 10001
EXPOSE 8080 9090
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9090/healthz', timeout=2)"]
CMD ["solapi-gateway", "serve", "--config", "/etc/solapi-gateway/gateway.yaml"]
