# syntax=docker/dockerfile:1.7
#
# The ingest / enrich image: one image, one console script (`falco-gitlab`), the role is the first
# argument (`falco-gitlab ingest --config ...`, `falco-gitlab enrich --config ...`).
#
# Build from the repository root (the build context must contain pyproject.toml and the packages):
#   docker build -f deploy/docker/pipeline.Dockerfile -t falco-gitlab-pipeline:0.1.0 .
# BuildKit reads deploy/docker/pipeline.Dockerfile.dockerignore, so only the packages are sent.
#
# Pin PYTHON_IMAGE to a digest for reproducible production builds:
#   --build-arg PYTHON_IMAGE=python:3.11-slim-bookworm@sha256:<digest>

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- build: a virtual environment with the project and its dependencies (all have wheels) ---------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/falco-gitlab/venv
WORKDIR /src
COPY pyproject.toml README* ./
COPY falco_gitlab ./falco_gitlab
COPY ingest ./ingest
COPY enrich ./enrich
COPY falco_source ./falco_source
COPY replay ./replay
RUN /opt/falco-gitlab/venv/bin/pip install --upgrade pip \
 && /opt/falco-gitlab/venv/bin/pip install /src \
 && /opt/falco-gitlab/venv/bin/python -m compileall -q /opt/falco-gitlab/venv \
 && /opt/falco-gitlab/venv/bin/falco-gitlab --version

# --- runtime: no compiler, no sources, no root -----------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="falco-gitlab-pipeline" \
      org.opencontainers.image.description="GitLab audit events to Kafka: ingest and enrich roles" \
      org.opencontainers.image.licenses="Apache-2.0"
# uid/gid 10001: above any distribution range, matches runAsUser in deploy/kubernetes.
RUN groupadd --system --gid 10001 falcogitlab \
 && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/falco-gitlab --no-create-home \
        --shell /usr/sbin/nologin falcogitlab \
 && install -d -o 10001 -g 10001 -m 0750 /var/lib/falco-gitlab /var/lib/falco-gitlab/ingest-spool \
 && install -d -o root -g root -m 0755 /etc/falco-gitlab
COPY --from=build /opt/falco-gitlab/venv /opt/falco-gitlab/venv
COPY --chmod=0755 deploy/docker/healthcheck.py /usr/local/bin/falco-gitlab-healthcheck
ENV PATH=/opt/falco-gitlab/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HEALTHCHECK_URL=http://127.0.0.1:8080/healthz
USER 10001:10001
WORKDIR /var/lib/falco-gitlab
# ingest's spool (spool.dir) must outlive the container: a named volume (compose) or a PVC (Kubernetes).
# Created here, owned by 10001, so that a new named volume inherits that ownership.
VOLUME ["/var/lib/falco-gitlab/ingest-spool"]
EXPOSE 8080 8443
# Ingest answers /healthz itself. For enrich, point HEALTHCHECK_URL at its metrics/health listener
# (see deploy/compose/compose.yaml); the check is the same script.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["/usr/local/bin/falco-gitlab-healthcheck"]
ENTRYPOINT ["falco-gitlab"]
CMD ["--help"]
