# syntax=docker/dockerfile:1.7
#
# Falco with the gitlabkafka source plugin, for plugin-only use (no kernel driver, no privileges).
#
# Build from the repository root:
#   docker build -f deploy/docker/falco.Dockerfile -t falco-gitlab-falco:0.1.0 .
#
# Why this shape: the plugin embeds CPython, so at dlopen time it needs libpython3.11.so.1.0, the
# standard library, and the project's virtual environment at the path baked in when it was built.
# The simplest way to guarantee all three match is to build and run on the SAME Python image:
#   - stage `plugin` builds the venv at /opt/falco-gitlab/venv and runs `falco-gitlab plugin build`
#     on python:3.11-slim-bookworm (shared libpython in /usr/local/lib, headers included; the
#     library gets an rpath to /usr/local/lib and the venv path baked in);
#   - the runtime stage is that same Python image plus the Falco binary copied out of the official
#     Debian-flavoured Falco image (Falco >= 0.40 ships `falcosecurity/falco:<v>` distroless and
#     `falcosecurity/falco:<v>-debian`; the old falco-no-driver image is gone). Falco's release build
#     links only against glibc, which the build checks below with ldd.
# The checks at the end load the plugin (`--list`) and compile the rules against its fields (`-V`),
# so an image whose plugin cannot start Python, or whose rules use unknown fields, fails to build.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG FALCO_IMAGE=falcosecurity/falco:0.44.1-debian

FROM ${FALCO_IMAGE} AS falco

# --- plugin: venv + shared library, built against the runtime's own Python -----------------------
FROM ${PYTHON_IMAGE} AS plugin
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
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
 && /opt/falco-gitlab/venv/bin/python -m compileall -q /opt/falco-gitlab/venv
# The venv path baked into the library is /opt/falco-gitlab/venv, identical in the runtime stage
# (FALCO_GITLAB_VENV overrides it at run time). PLUGIN_ID: 999 is the shared development ID; pass
# the ID registered with falcosecurity for a production build (docs/plugin.md).
ARG PLUGIN_ID=999
RUN /opt/falco-gitlab/venv/bin/falco-gitlab plugin build \
        --output /opt/falco-gitlab/lib/libgitlabkafka.so \
        --python-venv /opt/falco-gitlab/venv \
        --plugin-id "${PLUGIN_ID}" \
 && test -s /opt/falco-gitlab/lib/libgitlabkafka.so

# --- runtime --------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="falco-gitlab-falco" \
      org.opencontainers.image.description="Falco (plugin-only) with the gitlabkafka source plugin and rules" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 falco \
 && useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent --no-create-home \
        --shell /usr/sbin/nologin falco \
 && install -d -m 0755 /etc/falco /etc/falco/rules.d /etc/falco/rules.local.d /usr/share/falco/plugins
COPY --from=falco /usr/bin/falco /usr/bin/falco
COPY --from=plugin /opt/falco-gitlab/venv /opt/falco-gitlab/venv
COPY --from=plugin /opt/falco-gitlab/lib/libgitlabkafka.so /usr/share/falco/plugins/libgitlabkafka.so
COPY rules/gitlab.yaml /etc/falco/rules.d/gitlab.yaml
COPY deploy/docker/falco/falco.yaml /etc/falco/falco.yaml
COPY deploy/docker/falco/gitlab-local.yaml /etc/falco/rules.local.d/gitlab-local.yaml
COPY --chmod=0755 deploy/docker/healthcheck.py /usr/local/bin/falco-gitlab-healthcheck
ENV FALCO_GITLAB_VENV=/opt/falco-gitlab/venv \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HEALTHCHECK_URL=http://127.0.0.1:8765/healthz
RUN if ldd /usr/bin/falco | grep 'not found'; then echo 'falco: missing shared libraries' >&2; exit 1; fi \
 && if ldd /usr/share/falco/plugins/libgitlabkafka.so | grep 'not found'; then \
        echo 'libgitlabkafka.so: missing shared libraries' >&2; exit 1; fi \
 && falco --version \
 && falco -c /etc/falco/falco.yaml --list=gitlab > /dev/null \
 && falco -c /etc/falco/falco.yaml -V /etc/falco/rules.d/gitlab.yaml
USER 10001:10001
EXPOSE 8765
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["/usr/local/bin/falco-gitlab-healthcheck"]
ENTRYPOINT ["/usr/bin/falco"]
# Plugin-only: the syscall source must be disabled on the command line (no falco.yaml key does it).
CMD ["-c", "/etc/falco/falco.yaml", "--disable-source", "syscall"]
