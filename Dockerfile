# The seed's image idea on a maintained base: the app, a Consul agent, HAProxy and meshgen in one
# container, started by start.sh. HAProxy comes from Debian 13 (trixie): 3.0, an LTS branch
# HAProxy maintains; meshgen is installed with pip.
#
#   docker build -t meshgen .
#   docker build -t meshgen-redis --build-arg APP_PACKAGES=redis-server .
#
# Where no Docker engine runs, .ci/dockerfile-root.py performs these same steps in a chroot of
# Debian trixie (tests/e2e/test_container.py builds it and runs start.sh in it).
FROM hashicorp/consul:1.17 AS consul

FROM debian:trixie-slim

# Extra Debian packages for the app that runs beside the sidecar (for example redis-server).
ARG APP_PACKAGES=""

# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends haproxy=3.0.* python3=3.13.* python3-venv=3.13.* \
        ca-certificates ${APP_PACKAGES} \
 && rm -rf /var/lib/apt/lists/*

COPY --from=consul /bin/consul /usr/local/bin/consul

COPY pyproject.toml README.md meshgen.py authorize.lua /src/meshgen/
COPY templates /src/meshgen/templates
RUN python3 -m venv /opt/meshgen \
 && /opt/meshgen/bin/pip install --no-cache-dir /src/meshgen \
 && ln -s /opt/meshgen/bin/meshgen /usr/local/bin/meshgen \
 && rm -rf /src/meshgen
COPY --chmod=0755 start.sh /usr/local/bin/start.sh

# Not root: the sidecar's ports are above 1024, and nothing here needs privileges.
RUN useradd --system --uid 10001 --create-home --home-dir /var/lib/meshgen meshgen \
 && mkdir -p /etc/consul.d /var/lib/consul \
 && chown meshgen /var/lib/consul
USER 10001
ENV MESHGEN_OUT=/var/lib/meshgen/bundle \
    CONSUL_HTTP_ADDR=127.0.0.1:8500

ENTRYPOINT ["/usr/local/bin/start.sh"]
