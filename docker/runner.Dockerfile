# syntax=docker/dockerfile:1
# The per-session runner image: clones the repo, keeps the agent in tmux, serves the internal SSH endpoint.
# Build from the repository root:  docker build -f docker/runner.Dockerfile -t orzbob-cloud-runner:dev .

ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN python -m venv /opt/orz
COPY . .
RUN /opt/orz/bin/pip install . && /opt/orz/bin/orz --help >/dev/null

FROM ${PYTHON_IMAGE}
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="orzbob-cloud-runner" \
      org.opencontainers.image.description="Orzbob Cloud session runner: git, tmux and the agent" \
      org.opencontainers.image.source="https://github.com/orzbob/orzbob-cloud" \
      org.opencontainers.image.licenses="MIT" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}"
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# Debian security updates replace exact package versions, so pins would break rebuilds; the pinned
# base image tag fixes the distribution release instead.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends git tmux openssh-client ca-certificates locales \
    && sed -i 's/^# *en_US.UTF-8/en_US.UTF-8/' /etc/locale.gen && locale-gen \
    && rm -rf /var/lib/apt/lists/*
# uid 1000 matches the session Pod's runAsUser and fsGroup, so the workspace volume is writable.
RUN groupadd --gid 1000 orz \
    && useradd --uid 1000 --gid orz --home-dir /home/orz --create-home --shell /bin/bash orz \
    && install -d -o orz -g orz /workspace /run/orz
COPY --from=build /opt/orz /opt/orz
ENV PATH=/opt/orz/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    LANG=en_US.UTF-8 \
    HOME=/home/orz
WORKDIR /workspace
USER 1000:1000
EXPOSE 2222
ENTRYPOINT ["orz", "runner"]
