# syntax=docker/dockerfile:1
#
# jssocket in a container:
#   docker build -t jssocket .
#   docker run --rm -p 8080:80 -e SOCKET_AUTH="$(echo -n 'secret' | docker run --rm -i jssocket hash)" jssocket
#
# The server runs as an unprivileged user and still listens on port 80: Docker (20.10+),
# Podman and containerd 2 set net.ipv4.ip_unprivileged_port_start=0 in a container's own
# network namespace, so no capability is needed (and none is baked into the binary, which
# would make it fail to start under `--cap-drop ALL`). Where that sysctl is not set — host
# networking, CRI-O, older runtimes — set SOCKET_PORT to 1024 or above (e.g. 8080) and
# publish that port, or set the sysctl (it is a "safe" sysctl in Kubernetes).

# ---- build ---------------------------------------------------------------------------------
FROM rust:1-bookworm AS builder
WORKDIR /src
COPY . .
# The cache mounts keep the registry and compiled dependencies between builds; the binary is
# copied out of the (mounted, hence not persisted) target directory.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin jssocket \
    && install -m 0755 target/release/jssocket /usr/local/bin/jssocket

# ---- runtime -------------------------------------------------------------------------------
FROM debian:bookworm-slim

RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 jssocket \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin jssocket

COPY --from=builder /usr/local/bin/jssocket /usr/local/bin/jssocket

# Numeric, so Kubernetes' runAsNonRoot can verify it.
USER 10001:10001

ENV SOCKET_HOST=0.0.0.0 \
    SOCKET_PORT=80
EXPOSE 80

# bash's /dev/tcp instead of curl, so the image needs no HTTP client. It follows
# SOCKET_PORT, and SOCKET_HOST unless that is a wildcard address.
HEALTHCHECK --interval=15s --timeout=3s --start-period=5s --retries=3 \
    CMD ["bash", "-c", "host=${SOCKET_HOST:-0.0.0.0}; case $host in 0.0.0.0|::|'[::]'|'') host=127.0.0.1;; esac; exec 3<>/dev/tcp/$host/${SOCKET_PORT:-80} && printf 'GET /healthz HTTP/1.0\\r\\nHost: localhost\\r\\n\\r\\n' >&3 && read -r status <&3 && [[ $status == *' 200 '* ]]"]

# SIGTERM (docker stop) closes every WebSocket with 1001 and exits 0 within
# SOCKET_SHUTDOWN_TIMEOUT (5 s), inside docker stop's default 10 s grace period.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/jssocket"]
