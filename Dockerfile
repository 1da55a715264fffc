# solapi-gateway: a slim, non-root image.
#   docker build -t solapi-gateway .
#   docker run --rm -p 127.0.0.1:8080:8080 --stop-timeout 30 \
#     -e SOLAPI_API_KEY=NCS... -v "$PWD/solapi_api_secret:/run/secrets/solapi_api_secret:ro" \
#     solapi-gateway
# The gateway runs as uid 10001: the secret file must be readable by it (a 0600 file of
# yours is not). E.g. `chgrp 10001 solapi_api_secret && chmod 0640 solapi_api_secret`, or
# `docker run --user "$(id -u):$(id -g)" ...` to run as the file's owner (docs/deployment.md).
# The shipped config is config/gateway.yaml and config/policy.yaml at /etc/solapi-gateway/;
# mount your own folder there to replace them (keep admin_listen on port 9090, or change
# HEALTHCHECK). The demo's config and its secret are not in the image.
# SIGTERM drains within shutdown_grace_s (20 s): give `docker stop` more than that.
#
# The base image is pinned by digest, so a rebuild gets the same bytes. The digest is
# python:3.11-slim-bookworm's as recorded, verified against Docker Hub, by a public project
# pinning the same tag; this repository's build machines have no registry access to
# re-check it. To move to a newer one:
#   docker buildx imagetools inspect python:3.11-slim-bookworm   (the "Digest:" line)
FROM python:3.11-slim-bookworm@sha256:2e32f7d302adc1c37428355c1e646897c0c53f4fd60b6a551245fb90ee129f91

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
COPY config/gateway.yaml config/policy.yaml /etc/solapi-gateway/

USER 10001
EXPOSE 8080 9090
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9090/healthz', timeout=2)"]
CMD ["solapi-gateway", "serve", "--config", "/etc/solapi-gateway/gateway.yaml"]
