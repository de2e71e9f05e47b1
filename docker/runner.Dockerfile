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
    && apt-get install -y --no-install-recommends git tmux openssh-client bash ca-certificates locales tini \
       nodejs npm \
    && sed -i 's/^# *en_US.UTF-8/en_US.UTF-8/' /etc/locale.gen && locale-gen \
    && rm -rf /var/lib/apt/lists/*
# The claude CLI is an npm package: baked in with --build-arg INSTALL_CLAUDE=1, else users install it
# into their home (npm prefix below) from setup.init.
ARG INSTALL_CLAUDE=0
ARG CLAUDE_VERSION=latest
# hadolint ignore=DL3016
RUN if [ "$INSTALL_CLAUDE" = "1" ]; then npm install -g "@anthropic-ai/claude-code@${CLAUDE_VERSION}" && npm cache clean --force; fi
# uid 1000 matches the session Pod's runAsUser and fsGroup, so the workspace volume is writable.
RUN groupadd --gid 1000 orzbob \
    && useradd --uid 1000 --gid orzbob --home-dir /home/orzbob --create-home --shell /bin/bash orzbob \
    && install -d -o orzbob -g orzbob /workspace /run/orz
COPY --from=build /opt/orz /opt/orz
ENV PATH=/opt/orz/bin:/home/orzbob/.local/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    LANG=en_US.UTF-8 \
    HOME=/home/orzbob \
    NPM_CONFIG_PREFIX=/home/orzbob/.local
WORKDIR /workspace
USER 1000:1000
EXPOSE 2222
# tmux's server daemonizes; tini as PID 1 reaps what it leaves behind.
ENTRYPOINT ["tini", "--", "orz", "runner"]
