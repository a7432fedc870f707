# The critique-local server's own image. Sandboxes are separate (sandboxes/docker).
# Run `make deps` first: the web page's npm assets (critique_local/ui/node_modules) are copied in
# with the package; without them the page works without syntax highlighting.
# Offline installs can build on the imported base instead:
#   docker build --build-arg BASE_IMAGE=critique-local/base:bookworm -t critique-local .
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}

RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      python3 python3-venv git tar ca-certificates iptables util-linux \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/critique-local
COPY pyproject.toml README.md ./
COPY critique_local ./critique_local
RUN python3 -m venv /opt/venv && /opt/venv/bin/pip install --no-cache-dir .

ENV PATH=/opt/venv/bin:$PATH \
    CRITIQUE_LOCAL_SERVER_HOST=0.0.0.0 \
    CRITIQUE_LOCAL_SERVER_DATA_DIR=/var/lib/critique-local \
    CRITIQUE_LOCAL_GIT_LOCAL_ROOT=/srv/repos
VOLUME ["/var/lib/critique-local"]
EXPOSE 8787
ENTRYPOINT ["critique-local"]
CMD ["serve"]
