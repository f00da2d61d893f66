# syntax=docker/dockerfile:1
#
# botmetrics in a container: build with the Rust toolchain, run on a small
# Debian with nothing but the binary and curl (for the health check), as an
# unprivileged user, with the SQLite file and the journal on a volume.
#
#   docker build -t botmetrics .
#   docker run -d --name botmetrics -p 127.0.0.1:9464:9464 \
#       -v botmetrics-data:/var/lib/botmetrics \
#       -e BOTMETRICS_TOKENS=mybot=change-me botmetrics
#
# What was and was not verified with this file is in README.md, "Deploy".
# scripts/deploy_check.sh runs these same steps on the CI machine.

# The toolchain the project is built and tested with (Cargo.toml's
# rust-version is the floor).
ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-bookworm AS builder
WORKDIR /src
COPY . .
# --locked: the dependency versions of Cargo.lock, the ones CI tested, or
# fail. The cache mounts keep the registry and the build between builds
# (BuildKit, buildah); the binary is copied out of the cached target dir,
# which is not part of the image.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked \
    && install -D -m 0755 target/release/botmetrics /out/botmetrics

# bookworm, as the builder: the binary links glibc dynamically, and
# bookworm's is the one it was linked against.
FROM debian:bookworm-slim AS runtime
# curl runs the HEALTHCHECK (the binary has no health subcommand). Unpinned
# on purpose: a stable release's updates are security fixes.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends curl \
    && rm -rf /var/lib/apt/lists/*
# A fixed uid/gid, so a volume or a bind mount can be chowned to it from
# outside (chown -R 10001:10001 ...).
RUN groupadd --gid 10001 botmetrics \
    && useradd --uid 10001 --gid botmetrics --no-create-home \
        --home-dir /var/lib/botmetrics --shell /usr/sbin/nologin botmetrics \
    && install -d -m 0750 -o botmetrics -g botmetrics /var/lib/botmetrics
COPY --from=builder /out/botmetrics /usr/local/bin/botmetrics

# Configuration through the environment, not CMD flags: a flag would win
# over a variable the user sets (docker run -e, compose environment:), so
# each default here can be replaced one by one. The journal lives in
# $BOTMETRICS_DATA_DIR/journal/, beside the SQLite file, on the volume: a
# 202 is a promise only while the journal survives the container.
# (BOTMETRICS_DATABASE_URL set here means a plain DATABASE_URL is not read;
# set BOTMETRICS_DATABASE_URL instead.)
ENV BOTMETRICS_LISTEN=0.0.0.0:9464 \
    BOTMETRICS_DATABASE_URL=sqlite:///var/lib/botmetrics/botmetrics.db \
    BOTMETRICS_DATA_DIR=/var/lib/botmetrics
VOLUME ["/var/lib/botmetrics"]
WORKDIR /var/lib/botmetrics
USER 10001:10001
EXPOSE 9464
# /healthz answers 200 while the process serves. /readyz is for a balancer
# (503 while the store is unreachable, or on a standby), not a reason to
# restart a container that keeps counting into its journal.
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD ["curl", "-fsS", "-o", "/dev/null", "http://127.0.0.1:9464/healthz"]
# SIGTERM (Docker's default stop signal) drains requests for
# --shutdown-timeout (10s), then flushes: give `docker stop` more than
# its default 10 s (`docker stop -t 30`, compose stop_grace_period).
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/botmetrics"]
CMD []
