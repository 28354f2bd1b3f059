# quota-sidecar: runs beside the product container; see deploy/ for a pod and a compose file.
FROM python:3.11-slim

WORKDIR /app
COPY pyproject.toml README.md ./
COPY sidecar ./sidecar
RUN pip install --no-cache-dir . && useradd --uid 10001 --no-create-home sidecar \
    && mkdir /data && chown sidecar /data
COPY policies ./policies

USER 10001
ENV SIDECAR_POLICIES=/app/policies \
    SIDECAR_DATA_DIR=/data \
    SIDECAR_LISTEN=0.0.0.0:8000
EXPOSE 8000 9000
# Without SIDECAR_REDIS_URL the sidecar runs its embedded redis-server with data under /data.
# Exposing the admin port beyond loopback (SIDECAR_ADMIN=0.0.0.0:9000) needs SIDECAR_ADMIN_TOKEN.
HEALTHCHECK --interval=10s --timeout=2s CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9000/healthz', timeout=1)"
ENTRYPOINT ["sidecar"]
CMD ["run"]
