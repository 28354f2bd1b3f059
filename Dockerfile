# quota-sidecar: runs beside the product container; see deploy/ for a pod and a compose file.
#
#   docker build -t quota-sidecar:0.1.0 .          (from the repository root)
#   docker run --read-only --tmpfs /data:uid=10001,gid=10001 -p 127.0.0.1:8000:8000 quota-sidecar:0.1.0
#
# The image runs as UID/GID 10001 and writes nothing outside /data (the embedded store's data and
# the local journal), so it runs with a read-only root filesystem; give /data a tmpfs, an
# emptyDir or a volume (without one, Docker makes an anonymous volume for it).

# Build stage: the package and its dependencies into a virtualenv, copied whole into the image.
FROM python:3.11-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY sidecar ./sidecar
RUN python -m venv /opt/quota-sidecar \
    && /opt/quota-sidecar/bin/pip install --no-cache-dir .

FROM python:3.11-slim-bookworm
RUN groupadd --gid 10001 sidecar \
    && useradd --no-log-init --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin sidecar \
    && mkdir /data \
    && chown 10001:10001 /data \
    && chmod 0700 /data
COPY --from=build /opt/quota-sidecar /opt/quota-sidecar
COPY policies /app/policies
WORKDIR /app

# PYTHONDONTWRITEBYTECODE: the root filesystem is read-only (the bytecode was compiled at install).
ENV PATH=/opt/quota-sidecar/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    SIDECAR_POLICIES=/app/policies \
    SIDECAR_DATA_DIR=/data \
    SIDECAR_LISTEN=0.0.0.0:8000
VOLUME ["/data"]
USER 10001:10001
EXPOSE 8000 9000
# Without SIDECAR_REDIS_URL the sidecar runs its embedded redis-server with data under /data.
# Exposing the admin port beyond loopback (SIDECAR_ADMIN=0.0.0.0:9000) needs SIDECAR_ADMIN_TOKEN.
# The health check asks /healthz on the admin port's port number (SIDECAR_ADMIN, default 9000)
# over loopback, bypassing any HTTP proxy the environment names.
HEALTHCHECK --interval=10s --timeout=3s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; port = os.environ.get('SIDECAR_ADMIN', '127.0.0.1:9000').rpartition(':')[2]; u.build_opener(u.ProxyHandler({})).open(f'http://127.0.0.1:{port}/healthz', timeout=2)"]
ENTRYPOINT ["sidecar"]
CMD ["run"]
