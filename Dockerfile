# smslab/site — the smslab package (the `smslab` CLI and the site process `python -m sites`).
#
# With a registry:  docker build -t smslab/site:latest .
#   installs smslab from this source tree and its dependencies from PyPI.
# Without one:      scripts/build-local-images.sh
#   builds with --build-arg PYTHON_IMAGE=smslab/python:3.11 and a build context holding a
#   wheels/ directory (smslab's wheel and its dependencies'), installed with pip --no-index.
#
# The package lives in a venv at /opt/smslab (on PATH); the container runs as the unprivileged
# user smslab (uid/gid 1000 unless --build-arg SMSLAB_UID/SMSLAB_GID), in /lab, the default
# command prints the CLI's help. No dev or test dependencies. Works with the classic builder and
# with BuildKit. See docker/README.md.
ARG PYTHON_IMAGE=python:3.11-slim
FROM ${PYTHON_IMAGE} AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore

COPY . /src

RUN set -eux; \
    python -m venv /opt/smslab; \
    if ls /src/wheels/smslab-*.whl >/dev/null 2>&1; then \
        /opt/smslab/bin/pip install --no-index --find-links /src/wheels smslab; \
    else \
        /opt/smslab/bin/pip install /src; \
    fi; \
    /opt/smslab/bin/pip uninstall -y pip setuptools; \
    /opt/smslab/bin/python -c 'import sites, broker, emulator, pika, pydantic, tenacity, yaml'

FROM ${PYTHON_IMAGE}

ARG SMSLAB_UID=1000
ARG SMSLAB_GID=1000

RUN set -eux; \
    groupadd --gid "${SMSLAB_GID}" smslab; \
    useradd --uid "${SMSLAB_UID}" --gid smslab --home-dir /lab --no-create-home \
            --shell /bin/sh --comment smslab smslab; \
    mkdir -p /lab; \
    chown smslab:smslab /lab

COPY --from=build /opt/smslab /opt/smslab

ENV PATH=/opt/smslab/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    VIRTUAL_ENV=/opt/smslab \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

LABEL org.smslab.image=site \
      org.opencontainers.image.title=smslab \
      org.opencontainers.image.description="smslab: a lab emulator of an SMS 2.0 site hierarchy over RabbitMQ"

USER ${SMSLAB_UID}:${SMSLAB_GID}
WORKDIR /lab

CMD ["smslab", "--help"]
