# syntax=docker/dockerfile:1
# Multi-stage build: compile in the Rust image, run from a slim Debian base as
# an unprivileged user. The store lives on the /data volume; the config is
# read from /etc/idemproxy/idemproxy.toml (mount yours there, or set
# IDEMPROXY_CONFIG).

FROM rust:1.88-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
COPY examples ./examples
RUN cargo build --release --locked --bin idemproxy

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin idemproxy \
 && mkdir -p /data /etc/idemproxy \
 && chown idemproxy:idemproxy /data
COPY --from=build /src/target/release/idemproxy /usr/local/bin/idemproxy
COPY config/idemproxy.toml /etc/idemproxy/idemproxy.toml
ENV IDEMPROXY_CONFIG=/etc/idemproxy/idemproxy.toml
USER idemproxy
VOLUME ["/data"]
# 8080: the proxied API; 9901: admin (health, metrics, records API). The
# admin listener binds loopback by default, which is what the health check uses.
EXPOSE 8080 9901
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
  CMD curl -fsS http://127.0.0.1:9901/healthz || exit 1
ENTRYPOINT ["idemproxy"]
CMD ["run", "--data-dir", "/data/idemproxy"]
