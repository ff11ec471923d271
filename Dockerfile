# syntax=docker/dockerfile:1
# nats-pg-auth container image: build with the Rust toolchain, run on Debian slim as a non-root
# user. `nats-pg-auth` is the entrypoint, so `docker run IMAGE serve`, `... migrate`, `... init`.
#
#   docker build -t nats-pg-auth .
#
# The runtime image carries curl (for the /readyz and /healthz health checks of
# docker-compose.yaml) and ca-certificates (for TLS to a managed Postgres); nothing else.

ARG RUST_VERSION=1.89
ARG DEBIAN_RELEASE=bookworm

FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS build
WORKDIR /src
# Dependencies first, so source edits do not rebuild them.
COPY Cargo.toml Cargo.lock build.rs ./
RUN mkdir -p src benches \
 && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
 && echo 'fn main() {}' > benches/hot_path.rs && cp benches/hot_path.rs benches/load.rs \
 && cargo build --release --locked --bin nats-pg-auth || true
COPY src ./src
COPY migrations ./migrations
# .git is not in the build context: the commit comes in as a build arg
# (`docker build --build-arg GIT_SHA=$(git rev-parse --short=12 HEAD) .`), else `unknown`.
ARG GIT_SHA=unknown
ENV NATS_PG_AUTH_GIT_SHA=${GIT_SHA}
RUN touch src/main.rs src/lib.rs \
 && cargo build --release --locked --bin nats-pg-auth \
 && cp target/release/nats-pg-auth /nats-pg-auth

FROM debian:${DEBIAN_RELEASE}-slim AS runtime
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 nats-pg-auth \
 && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/nats-pg-auth --shell /usr/sbin/nologin nats-pg-auth \
 # Mount points the compose file and the manifests use. A named volume mounted on an existing
 # directory starts with its owner, so the non-root user can write the key and the fragment.
 && mkdir -p /var/lib/nats-pg-auth /etc/nats/pg-auth \
 && chown nats-pg-auth:nats-pg-auth /var/lib/nats-pg-auth /etc/nats/pg-auth
COPY --from=build /nats-pg-auth /usr/local/bin/nats-pg-auth
USER 10001:10001
WORKDIR /var/lib/nats-pg-auth
ENV NATS_PG_AUTH_LOG_FORMAT=json \
    NATS_PG_AUTH_HTTP_LISTEN=0.0.0.0:9464
EXPOSE 9464
ENTRYPOINT ["nats-pg-auth"]
CMD ["serve"]
