# leak-responder container image.
#
# Two stages: the builder installs the package and its dependencies into a virtualenv; the final
# stage copies only that virtualenv onto a clean python:3.11-slim, so no compiler, pip cache or
# source tree ships. Every dependency has a manylinux wheel, so the builder needs no build tools
# either. Both stages must use the same base image: the venv's interpreter is a symlink into it.
# Pin PYTHON_IMAGE by digest in CI (python:3.11-slim@sha256:…) for reproducible builds.
#
# Settings come from the environment only (docs/operations.md lists them all); nothing secret is
# baked in, and .dockerignore keeps any local .env out of the build context.
ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml README.md ./
COPY service ./service
# A regular (not editable) install; pip byte-compiles it here, which matters because the runtime
# root filesystem is read-only. pip and setuptools are then removed: nothing is installed at run time.
RUN /opt/venv/bin/pip install . \
 && /opt/venv/bin/python -m pip uninstall -y pip setuptools

FROM ${PYTHON_IMAGE}
# A fixed numeric uid/gid: Kubernetes' runAsNonRoot can only verify a numeric USER, and the
# manifests in deploy/ (runAsUser: 10001) and the PVC's fsGroup rely on this exact number.
RUN groupadd --system --gid 10001 leak-responder \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin leak-responder \
 && mkdir /data \
 && chown 10001:10001 /data \
 && chmod 0700 /data
COPY --from=builder /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    LEAK_RESPONDER_DATABASE_URL=sqlite:////data/leak-responder.db
# The service reads ./.env if present; an empty root-owned working directory means none is, unless
# an operator mounts one on purpose.
WORKDIR /app
# The SQLite default: the database and, without LEAK_RESPONDER_DATA_KEY, its key file
# (leak-responder.db.key) live here. Mount a persistent volume; with PostgreSQL it stays unused.
VOLUME ["/data"]
USER 10001:10001
EXPOSE 8000
# No curl in slim; the interpreter is already there. urlopen raises (exit 1) on any non-2xx or
# connection error. Liveness only: /readyz depends on the store and would restart a healthy
# process during a database outage.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/livez', timeout=4)"]
# `docker run IMAGE` serves; `docker run IMAGE check-config` (or `migrate`) runs another command.
ENTRYPOINT ["leak-responder"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
