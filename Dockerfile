# solapi-gateway: a slim, non-root image.
#   docker build -t solapi-gateway .
#   docker run --rm -p 127.0.0.1:8080:8080 --stop-timeout 30 \
#     -e SOLAPI_API_KEY=NCS... -v "$PWD/solapi_api_secret:/run/secrets/solapi_api_secret:ro" \
#     solapi-gateway
# The shipped config is config/gateway.yaml at /etc/solapi-gateway/gateway.yaml; mount your
# own folder there to replace it (keep admin_listen on port 9090, or change HEALTHCHECK).
# SIGTERM drains within shutdown_grace_s (20 s): give `docker stop` more than that.
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
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9090/healthz', timeout=2)"]
CMD ["solapi-gateway", "serve", "--config", "/etc/solapi-gateway/gateway.yaml"]
