# syntax=docker/dockerfile:1
# The control-plane image: `orz api`, `orz gateway`, `orz scheduler` and `orz admin` (one per container).
# Build from the repository root:  docker build -f docker/api.Dockerfile -t orzbob-cloud:dev .

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
LABEL org.opencontainers.image.title="orzbob-cloud" \
      org.opencontainers.image.description="Orzbob Cloud control plane: API, SSH gateway and scheduler" \
      org.opencontainers.image.source="https://github.com/orzbob/orzbob-cloud" \
      org.opencontainers.image.licenses="MIT" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}"
# A fixed uid the chart's securityContext refers to (runAsUser 10001), with no login shell.
RUN groupadd --system --gid 10001 orz \
    && useradd --system --uid 10001 --gid orz --home-dir /var/lib/orz --shell /usr/sbin/nologin orz \
    && install -d -o orz -g orz /var/lib/orz
COPY --from=build /opt/orz /opt/orz
ENV PATH=/opt/orz/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    ORZ_DATA_DIR=/var/lib/orz
WORKDIR /var/lib/orz
USER 10001:10001
EXPOSE 8080 2222 8443
ENTRYPOINT ["orz"]
CMD ["api"]
