# dcon-receiver as a container image.
#
#   docker build -t dcon-receiver .
#   docker build --build-arg EXTRAS=redis,nats -t dcon-receiver .     # with broker sinks
#   docker run -p 8443:8443 -v "$PWD/certs:/certs:ro" -v dcon-data:/data \
#       -e DCON_DT_ORG_ID=... dcon-receiver
#
# Configuration comes only from the environment (DCON_*, see README.md); certificates,
# secrets and data are mounted, never baked in. The server runs as uid 10001, which must be
# able to read /certs/server-key.pem and write /data. container/check builds and runs this
# file end to end; container/README.md says more.

# Every stage starts from the same base, so the virtualenv made in `build` runs unchanged in
# the final stage: its scripts name /opt/venv/bin/python3, a link to the base's own python3.
# Any Debian-like image with python3 >= 3.11, its venv module, useradd and groupadd will do.
ARG BASE_IMAGE=python:3.11-slim
# A fixed numeric id, so that mounted directories can be given to it and an orchestrator's
# runAsNonRoot can check it without reading /etc/passwd. (Not UID: bash reserves that name.)
ARG APP_UID=10001


# The server's user and the directories it owns: all the final stage needs to run, so that
# stage only copies and configures.
FROM ${BASE_IMAGE} AS runtime-base
ARG APP_UID
RUN groupadd --system --gid "${APP_UID}" dcon \
    && useradd --system --uid "${APP_UID}" --gid dcon --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin dcon \
    && mkdir /data /certs \
    && chown dcon:dcon /data /certs


FROM ${BASE_IMAGE} AS build
WORKDIR /src

# Dependencies first, in a layer of their own: it is rebuilt only when pyproject.toml or
# EXTRAS change, not on every change to the code. It includes the build system, so that the
# package itself installs below without fetching anything. `python3`, not `python`: Debian's
# own python3 packages have no `python`.
ARG EXTRAS=""
COPY pyproject.toml container/requirements.py ./
RUN python3 -m venv /opt/venv \
    && python3 requirements.py pyproject.toml "${EXTRAS}" > requirements.txt \
    && /opt/venv/bin/pip install --no-cache-dir --requirement requirements.txt

# README.md is the package's long description: building it needs the file.
COPY README.md ./
COPY app/ app/
RUN /opt/venv/bin/pip install --no-cache-dir --no-deps --no-build-isolation .


FROM runtime-base
ARG APP_UID
LABEL org.opencontainers.image.title="dcon-receiver" \
      org.opencontainers.image.description="Receiver for Disruptive Technologies Data Connectors" \
      org.opencontainers.image.licenses="MIT"

COPY --from=build /opt/venv /opt/venv

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    DCON_HOST=0.0.0.0 \
    DCON_PORT=8443 \
    DCON_FILE_PATH=/data/events.jsonl \
    DCON_TLS_CERTFILE=/certs/server.pem \
    DCON_TLS_KEYFILE=/certs/server-key.pem

VOLUME ["/data", "/certs"]
USER ${APP_UID}:${APP_UID}
EXPOSE 8443

# Asks the server's own /healthz over the scheme and port the same DCON_* settings choose.
HEALTHCHECK --interval=30s --timeout=10s --start-period=15s --retries=3 \
    CMD ["dcon-receiver", "healthcheck"]

ENTRYPOINT ["dcon-receiver"]
CMD ["serve"]
