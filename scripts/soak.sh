#!/usr/bin/env bash
# Soak test (not part of CI): builds the release binaries, starts jssocket on a loopback port
# and, for SOAK_SECONDS, runs connection churn with broadcasts (`jssocket-bench churn`) and a
# bad-input sender (scripts/soak_bad_input.py) against it at the same time. Records the
# server's RSS (start, every SOAK_SAMPLE seconds, end), its warnings and errors, whether it
# still answers /healthz, and how long SIGTERM takes. Prints a summary; keeps every log in
# SOAK_DIR.
#
#   bash scripts/soak.sh                       # 10 minutes, 2000 clients, 50 conns/s, 10 bcasts/s
#   SOAK_SECONDS=60 SOAK_CLIENTS=500 bash scripts/soak.sh
#
# Exit status: 0 when the churn reported no loss and the server survived and shut down
# cleanly; 1 otherwise.
#
# Needs python3 with `websockets` (pip install websockets) for the bad-input sender.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

SOAK_SECONDS="${SOAK_SECONDS:-600}"
SOAK_CLIENTS="${SOAK_CLIENTS:-2000}"
SOAK_RATE="${SOAK_RATE:-50}"                    # disconnects (and connects) per second
SOAK_BROADCAST_RATE="${SOAK_BROADCAST_RATE:-10}" # notify_all per second
SOAK_SIZE="${SOAK_SIZE:-256}"                   # broadcast payload bytes
SOAK_BAD_CONNS="${SOAK_BAD_CONNS:-4}"           # bad-input connections
SOAK_BAD_RATE="${SOAK_BAD_RATE:-20}"            # bad messages per second, all of them
SOAK_PORT="${SOAK_PORT:-18390}"
SOAK_SAMPLE="${SOAK_SAMPLE:-30}"                # seconds between RSS samples
SOAK_PROGRESS="${SOAK_PROGRESS:-5}"             # seconds between progress lines (0: none)
SOAK_MAX_MESSAGE_SIZE="${SOAK_MAX_MESSAGE_SIZE:-65536}"
SOAK_DIR="${SOAK_DIR:-$(mktemp -d /tmp/jssocket-soak.XXXXXX)}"
mkdir -p "$SOAK_DIR"

log() { printf '==> %s\n' "$*" >&2; }

python3 -c 'import websockets' 2>/dev/null || {
    echo "error: python3 module 'websockets' is missing (pip install websockets)" >&2
    exit 1
}

log "building release binaries"
cargo build --release --workspace --bins >&2
# Run copies, so a rebuild during the soak does not touch the running binaries.
TARGET_DIR="${CARGO_TARGET_DIR:-target}"
cp "$TARGET_DIR/release/jssocket" "$TARGET_DIR/release/jssocket-bench" "$SOAK_DIR/"
SERVER="$SOAK_DIR/jssocket"
BENCH="$SOAK_DIR/jssocket-bench"

ulimit -n "$(ulimit -Hn)"

rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }
threads() { awk '/^Threads:/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }
fds() { find "/proc/$1/fd" -mindepth 1 -maxdepth 1 2>/dev/null | wc -l; }

URL="ws://127.0.0.1:$SOAK_PORT/ws"
log "starting the server on 127.0.0.1:$SOAK_PORT (logs: $SOAK_DIR/server.log)"
# Default admin password (12345678): the bench's default --auth.
env -u SOCKET_AUTH RUST_LOG="${RUST_LOG:-info}" "$SERVER" -h 127.0.0.1 -p "$SOAK_PORT" \
    --max-message-size "$SOAK_MAX_MESSAGE_SIZE" >"$SOAK_DIR/server.log" 2>&1 &
SERVER_PID=$!
BAD_PID=""
SAMPLER_PID=""
PROGRESS_PID=""
cleanup() {
    for pid in $BAD_PID $SAMPLER_PID $PROGRESS_PID $SERVER_PID; do
        kill "$pid" 2>/dev/null || true
    done
}
trap cleanup EXIT

for _ in $(seq 100); do
    curl -fsS "http://127.0.0.1:$SOAK_PORT/healthz" >/dev/null 2>&1 && break
    sleep 0.1
done
curl -fsS "http://127.0.0.1:$SOAK_PORT/healthz" >/dev/null || { echo "server did not start" >&2; exit 1; }

RSS_START=$(rss_kib "$SERVER_PID")
log "server pid $SERVER_PID, RSS at start ${RSS_START} KiB"

# RSS / threads / fds every SOAK_SAMPLE seconds.
(
    t0=$(date +%s)
    while kill -0 "$SERVER_PID" 2>/dev/null; do
        echo "$(( $(date +%s) - t0 )) $(rss_kib "$SERVER_PID") $(threads "$SERVER_PID") $(fds "$SERVER_PID")"
        sleep "$SOAK_SAMPLE"
    done
) >"$SOAK_DIR/rss.txt" &
SAMPLER_PID=$!

# A progress line every SOAK_PROGRESS seconds, from the server's own /metrics: connections
# open now, messages received and sent, errors answered, RSS.
metric_sum() { awk -v name="$1" '$1 == name || index($1, name "{") == 1 {s += $2} END {printf "%d", s}'; }
progress() {
    local t0 m
    t0=$(date +%s)
    while kill -0 "$SERVER_PID" 2>/dev/null; do
        sleep "$SOAK_PROGRESS"
        m=$(curl -fsS --max-time 2 "http://127.0.0.1:$SOAK_PORT/metrics" 2>/dev/null) || m=""
        log "$(printf '[%4d s / %d s] connections %s, messages in %s, out %s, errors %s, RSS %s KiB' \
            "$(( $(date +%s) - t0 ))" "$SOAK_SECONDS" \
            "$(metric_sum jssocket_connections <<<"$m")" \
            "$(metric_sum jssocket_messages_received_total <<<"$m")" \
            "$(metric_sum jssocket_messages_sent_total <<<"$m")" \
            "$(metric_sum jssocket_errors_total <<<"$m")" \
            "$(rss_kib "$SERVER_PID")")"
    done
}
if [ "$SOAK_PROGRESS" != 0 ]; then
    progress &
    PROGRESS_PID=$!
fi

log "bad-input sender: $SOAK_BAD_CONNS connections, $SOAK_BAD_RATE msgs/s"
python3 scripts/soak_bad_input.py "$URL" "$SOAK_SECONDS" --conns "$SOAK_BAD_CONNS" \
    --rate "$SOAK_BAD_RATE" --max-size "$SOAK_MAX_MESSAGE_SIZE" >"$SOAK_DIR/bad_input.txt" 2>&1 &
BAD_PID=$!

CHURN_CMD=("$BENCH" --url "$URL" --server-pid "$SERVER_PID" --timeout "$((SOAK_SECONDS + 180))"
    --progress 0 churn --clients "$SOAK_CLIENTS" --duration "$SOAK_SECONDS" --rate "$SOAK_RATE"
    --broadcast-rate "$SOAK_BROADCAST_RATE" --size "$SOAK_SIZE")
log "churn: ${CHURN_CMD[*]}"
churn_status=0
"${CHURN_CMD[@]}" >"$SOAK_DIR/churn.txt" 2>&1 || churn_status=$?

wait "$BAD_PID" || true
BAD_PID=""

RSS_END=$(rss_kib "$SERVER_PID")
healthy=no
curl -fsS "http://127.0.0.1:$SOAK_PORT/healthz" >/dev/null 2>&1 && healthy=yes
# Let every closed connection go, then sample once more: what stays is the idle footprint.
sleep 5
RSS_IDLE=$(rss_kib "$SERVER_PID")
FDS_IDLE=$(fds "$SERVER_PID")
# The hub's gauges once everyone left: all 0 (nothing left behind).
GAUGES=$(curl -fsS "http://127.0.0.1:$SOAK_PORT/metrics" 2>/dev/null |
    grep -E '^jssocket_(connections|admins|clients|acknowledged_clients|servers|groups|channels|pending_connects) ' |
    tr '\n' ' ' || true)
kill "$SAMPLER_PID" $PROGRESS_PID 2>/dev/null || true
SAMPLER_PID=""
PROGRESS_PID=""

t_term=$(date +%s.%N)
kill -TERM "$SERVER_PID"
server_status=0
wait "$SERVER_PID" || server_status=$?
SERVER_PID=""
term_secs=$(awk -v a="$t_term" -v b="$(date +%s.%N)" 'BEGIN {printf "%.2f", b - a}')

RSS_MAX=$(awk 'BEGIN {m = 0} $2 > m {m = $2} END {print m}' "$SOAK_DIR/rss.txt")
warns=$(grep -c ' WARN ' "$SOAK_DIR/server.log" || true)
errors=$(grep -c ' ERROR ' "$SOAK_DIR/server.log" || true)
panics=$(grep -ci 'panicked' "$SOAK_DIR/server.log" || true)
slow=$(grep -c 'slow consumer' "$SOAK_DIR/server.log" || true)

echo "== soak: ${SOAK_SECONDS}s, $SOAK_CLIENTS clients, churn $SOAK_RATE/s, $SOAK_BROADCAST_RATE broadcasts/s of $SOAK_SIZE B; logs in $SOAK_DIR"
echo "== churn (exit $churn_status):"
grep -v '^{' "$SOAK_DIR/churn.txt" || true
echo "== bad input:"
cat "$SOAK_DIR/bad_input.txt"
echo "== server: RSS start ${RSS_START} KiB, end ${RSS_END} KiB, max sampled ${RSS_MAX} KiB, idle after 5 s ${RSS_IDLE} KiB (${FDS_IDLE} fds)"
echo "== server: gauges after everyone left: ${GAUGES:-(no /metrics)}"
echo "== server: log lines WARN $warns (1 is the default-password warning), ERROR $errors, panics $panics, slow-consumer closes $slow"
echo "== server: /healthz after the soak: $healthy; SIGTERM -> exit $server_status in ${term_secs}s"
echo "== RSS samples (s, KiB, threads, fds): $SOAK_DIR/rss.txt"

if [ "$churn_status" -ne 0 ] || [ "$healthy" != yes ] || [ "$server_status" -ne 0 ] || [ "$panics" -ne 0 ]; then
    exit 1
fi
