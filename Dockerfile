# syntax=docker/dockerfile:1
# The sidecar image: an unprivileged user (uid/gid 10001), the store on the
# /data volume, the config read from /etc/idemproxy/idemproxy.toml (mount
# yours there, or set IDEMPROXY_CONFIG).
#
#   docker build -t idemproxy .
#       compiles in the Rust image, runs from debian:bookworm-slim.
#   podman build --build-arg BASE=localhost/bookworm-base --build-arg BINARY=prebuilt .
#       takes target/release/idemproxy (built beforehand with
#       `cargo build --release --locked` on a glibc no newer than the base's)
#       and a local base image: no registry is needed (scripts/image-check).

# The runtime stage's base: any Debian-like image; ca-certificates and curl
# are installed from apt only if the base lacks them.
ARG BASE=debian:bookworm-slim
# Where the binary comes from: "build" (compiled below) or "prebuilt".
ARG BINARY=build
# The prebuilt binary's path in the build context (scripts/image-check may
# use the debug build that the tests already made).
ARG PREBUILT=target/release/idemproxy

FROM rust:1.88-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
COPY examples ./examples
RUN cargo build --release --locked --bin idemproxy \
 && install -D target/release/idemproxy /out/idemproxy

FROM scratch AS prebuilt
ARG PREBUILT
COPY ${PREBUILT} /out/idemproxy

# Only the stage named by BINARY is built (BuildKit and buildah skip the other).
FROM ${BINARY} AS binary

FROM ${BASE} AS runtime
# ca-certificates: https:// upstreams and rediss://; curl: the HEALTHCHECK and
# the Kubernetes exec probes (deploy/app.yaml).
RUN set -eu; \
    if ! command -v curl >/dev/null 2>&1 || ! test -s /etc/ssl/certs/ca-certificates.crt; then \
      apt-get update; \
      apt-get install -y --no-install-recommends ca-certificates curl; \
      rm -rf /var/lib/apt/lists/*; \
    fi; \
    groupadd --gid 10001 idemproxy; \
    useradd --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin idemproxy; \
    mkdir -p /data /etc/idemproxy; \
    chown 10001:10001 /data
COPY --from=binary /out/idemproxy /usr/local/bin/idemproxy
COPY config/idemproxy.toml /etc/idemproxy/idemproxy.toml
ENV IDEMPROXY_CONFIG=/etc/idemproxy/idemproxy.toml
# Numeric, so that Kubernetes' runAsNonRoot can verify it without /etc/passwd.
USER 10001:10001
VOLUME ["/data"]
# 8080: the proxied API; 9901: admin (health, metrics, records API). The
# admin listener binds loopback by default, which is what the health check uses.
EXPOSE 8080 9901
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
  CMD curl -fsS http://127.0.0.1:9901/healthz || exit 1
ENTRYPOINT ["idemproxy"]
CMD ["run", "--data-dir", "/data/idemproxy"]
