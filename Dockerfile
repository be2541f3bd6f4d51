# syntax=docker/dockerfile:1
# Multi-stage build: compile in the Rust image, run from a slim Debian with a non-root user.
FROM rust:1-slim-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs ./
COPY src ./src
COPY vendor ./vendor
COPY benches ./benches
COPY tests ./tests
RUN cargo build --release --locked --bin parley

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /var/lib/parley --create-home parley
COPY --from=build /src/target/release/parley /usr/local/bin/parley
USER parley
WORKDIR /var/lib/parley
VOLUME ["/var/lib/parley/data"]
EXPOSE 8080
# Off loopback parley requires an admin key: pass PARLEY_ADMIN_KEY at run time.
ENTRYPOINT ["parley", "serve", "--listen", "0.0.0.0:8080", "--data-dir", "/var/lib/parley/data"]
