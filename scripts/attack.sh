#!/usr/bin/env bash
# The attacks of issue 10, scripted (not part of CI): for each attack, starts a fresh server
# on loopback (and, for the cluster attacks, a redis-server and two or three nodes), runs
# `jssocket-bench attack <name>` against it for ATTACK_DURATION seconds while a bystander
# client measures its notify round trip, stops everything, and finally prints one line per
# attack. Every server is killed on exit (trap), whatever happens.
#
#   bash scripts/attack.sh                          # every attack, 15 s each (~6 minutes)
#   bash scripts/attack.sh auth-flood memory-pin    # only these
#   JSSOCKET_BIN=/path/to/old/jssocket bash scripts/attack.sh   # measure another build
#   ATTACK_DURATION=5 ATTACK_ARGS="--conns 500" bash scripts/attack.sh connect-flood
#
# Environment: JSSOCKET_BIN (the server to attack; default: the release build of this tree),
# ATTACK_DURATION (seconds of attack, default 15), ATTACK_ARGS (more `attack` options, e.g.
# `--conns N` to scale an attack down), ATTACK_DIR (logs and outputs; default a new temporary
# directory), ATTACK_PORT (first port, default 18600), ATTACK_FD_NOFILE (the server's
# descriptor limit in fd-flood, default 16384: below the ~19,000 connections the attacker
# holds, so the attack can exhaust it; the attacker itself is bound by `ulimit -Hn`),
# RUST_LOG (the servers' log level, default info), ATTACK_BUILD=0 (use the binaries already
# in target/release instead of building them), ATTACK_SERVER_ARGS (more options for every
# server, e.g. `--max-memory 128M`).
#
# Summary columns: attack, bystander p99 and max (ms), bystander notifications lost, the
# highest peak RSS of the servers (MB, VmHWM), whether a backend logged in during the attack
# (and in how many ms), then what is particular to the attack. Targets (issue 10): p99
# <= 100 ms, RSS <= 300 MB, login <= 2 s; a missed one is marked with `!`.
#
# Needs: cargo, curl, jq, and redis-server for the cluster attacks.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

ALL=(connect-flood connect-flood-slow-backend auth-flood auth-flood-nat fd-flood memory-pin
    cluster-forward-flood cluster-notify-flood cluster-node-death slow-consumer)
if [ "$#" -gt 0 ]; then SCENARIOS=("$@"); else SCENARIOS=("${ALL[@]}"); fi

ATTACK_DURATION="${ATTACK_DURATION:-15}"
ATTACK_PORT="${ATTACK_PORT:-18600}"
ATTACK_FD_NOFILE="${ATTACK_FD_NOFILE:-16384}"
ATTACK_DIR="${ATTACK_DIR:-$(mktemp -d /tmp/jssocket-attack.XXXXXX)}"
read -r -a EXTRA <<<"${ATTACK_ARGS:-}"
read -r -a SERVER_EXTRA <<<"${ATTACK_SERVER_ARGS:-}"
mkdir -p "$ATTACK_DIR"
export RUST_LOG="${RUST_LOG:-info}"

log() { printf '==> %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

for s in "${SCENARIOS[@]}"; do
    [[ " ${ALL[*]} " == *" $s "* ]] || die "unknown attack $s (one of: ${ALL[*]})"
done
command -v jq >/dev/null || die "jq is missing (apt-get install jq)"
command -v curl >/dev/null || die "curl is missing (apt-get install curl)"

if [ "${ATTACK_BUILD:-1}" != 0 ]; then
    log "building release binaries"
    cargo build --release --locked --workspace --bins >&2
fi
TARGET_DIR="${CARGO_TARGET_DIR:-target}"
# Run copies, so a rebuild meanwhile does not touch the running binaries.
cp "$TARGET_DIR/release/jssocket-bench" "$ATTACK_DIR/"
BENCH="$ATTACK_DIR/jssocket-bench"
if [ -n "${JSSOCKET_BIN:-}" ]; then
    SERVER="$JSSOCKET_BIN"
else
    cp "$TARGET_DIR/release/jssocket" "$ATTACK_DIR/"
    SERVER="$ATTACK_DIR/jssocket"
fi
[ -x "$SERVER" ] || die "$SERVER is not an executable"
log "attacking $SERVER; logs and outputs in $ATTACK_DIR"

ulimit -n "$(ulimit -Hn)"

PIDS=()
cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do
        kill -9 "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    PIDS=()
}
trap cleanup EXIT

# start_server NAME PORT NOFILE [ARGS...]: a server on 127.0.0.1:PORT with the default admin
# password (the bench's default --auth), its stderr and stdout in NAME.log; sets SERVER_PID.
start_server() {
    local name="$1" port="$2" nofile="$3"
    shift 3
    (ulimit -n "$nofile" && exec env -u SOCKET_AUTH "$SERVER" -h 127.0.0.1 -p "$port" "$@" \
        "${SERVER_EXTRA[@]}") \
        >"$ATTACK_DIR/$name.log" 2>&1 &
    SERVER_PID=$!
    PIDS+=("$SERVER_PID")
    for _ in $(seq 100); do
        curl -fsS "http://127.0.0.1:$port/healthz" >/dev/null 2>&1 && return 0
        kill -0 "$SERVER_PID" 2>/dev/null || break
        sleep 0.1
    done
    die "server $name did not start (see $ATTACK_DIR/$name.log)"
}

# start_redis PORT: a throwaway redis-server.
start_redis() {
    command -v redis-server >/dev/null || die "redis-server is missing (apt-get install redis-server)"
    redis-server --port "$1" --bind 127.0.0.1 --save '' --appendonly no --daemonize no \
        --loglevel warning >"$ATTACK_DIR/redis.log" 2>&1 &
    PIDS+=("$!")
    for _ in $(seq 50); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.1
    done
    die "redis-server did not start on port $1"
}

# wait_cluster PORT N: until the node on PORT sees N nodes (its /metrics), at most 15 s.
wait_cluster() {
    for _ in $(seq 150); do
        curl -fsS -H 'Authorization: Bearer 12345678' "http://127.0.0.1:$1/metrics" 2>/dev/null |
            grep -Eq "^jssocket_cluster_nodes $2(\.0)?\$" && return 0
        sleep 0.1
    done
    die "the node on port $1 does not see $2 nodes"
}

SUMMARY=()
run_attack() {
    local s="$1" port="$ATTACK_PORT"
    local bench_args=(--per-source 1000 --timeout "$((ATTACK_DURATION + 90))")
    local attack_args=(--duration "$ATTACK_DURATION")
    case "$s" in
    cluster-*)
        local rport=$((port + 10)) nodes=2 pb pc pa
        [ "$s" = cluster-node-death ] && nodes=3
        start_redis "$rport"
        local redis=(--redis-url "redis://127.0.0.1:$rport/")
        start_server "$s-A" "$port" "$(ulimit -Hn)" "${redis[@]}"
        pa=$SERVER_PID
        start_server "$s-B" "$((port + 1))" "$(ulimit -Hn)" "${redis[@]}"
        pb=$SERVER_PID
        attack_args+=(--node-url "ws://127.0.0.1:$((port + 1))/ws" --node-pid "$pb"
            --log-file "$ATTACK_DIR/$s-A.log" --log-file "$ATTACK_DIR/$s-B.log")
        if [ "$nodes" = 3 ]; then
            start_server "$s-C" "$((port + 2))" "$(ulimit -Hn)" "${redis[@]}"
            pc=$SERVER_PID
            attack_args+=(--node-url "ws://127.0.0.1:$((port + 2))/ws" --node-pid "$pc"
                --log-file "$ATTACK_DIR/$s-C.log")
        fi
        wait_cluster "$port" "$nodes"
        bench_args+=(--server-pid "$pa")
        ;;
    fd-flood)
        start_server "$s" "$port" "$ATTACK_FD_NOFILE"
        bench_args+=(--server-pid "$SERVER_PID")
        ;;
    *)
        start_server "$s" "$port" "$(ulimit -Hn)"
        bench_args+=(--server-pid "$SERVER_PID")
        ;;
    esac
    log "$s"
    local status=0
    timeout "$((ATTACK_DURATION + 120))" "$BENCH" --url "ws://127.0.0.1:$port/ws" \
        "${bench_args[@]}" attack "$s" "${attack_args[@]}" "${EXTRA[@]}" \
        >"$ATTACK_DIR/$s.out" 2>"$ATTACK_DIR/$s.err" || status=$?
    grep -v '^{' "$ATTACK_DIR/$s.out" >&2 || true
    cleanup
    local j
    j=$(grep '^{' "$ATTACK_DIR/$s.out" | tail -1 || true)
    if [ -z "$j" ] || [ "$(jq -r '.error // empty' <<<"$j")" != "" ]; then
        SUMMARY+=("$(printf '%-27s  failed (exit %s): %s' "$s" "$status" \
            "$( (jq -r '.error // empty' <<<"$j" 2>/dev/null; tail -2 "$ATTACK_DIR/$s.err") | tr '\n' ' ')")")
        return 0
    fi
    SUMMARY+=("$(jq -r --arg s "$s" '
        def mark(ok): if ok then "" else "!" end;
        [ $s,
          ((.bystander.p99_ms | tostring) + mark(.targets.bystander_p99_le_100ms)),
          (.bystander.max_ms | tostring),
          ((.bystander.lost | tostring) + "/" + (.bystander.sent | tostring)),
          ((.peak_rss_mb | tostring) + mark(.targets.peak_rss_le_300mb)),
          ((if .backend_login.ok then "yes," else "no," end) + (.backend_login.ms | tostring)
             + mark(.targets.login_le_2s)),
          (.extra_line + "; healthz failed " + (.healthz.failed | tostring)
             + "/" + ((.healthz.ok + .healthz.failed) | tostring)
             + "; attackers closed " + (.attackers.closed_by_server | tostring)
             + "/" + (.attackers.held | tostring)
             + (if .log_bytes > 0 then "; log bytes " + (.log_bytes | tostring) else "" end)
             + (if .bystander.closed then "; bystander closed: " + .bystander.closed else "" end))
        ] | "\(.[0])|\(.[1])|\(.[2])|\(.[3])|\(.[4])|\(.[5])|\(.[6])"' <<<"$j" |
        awk -F'|' '{printf "%-27s  %9s  %9s  %9s  %8s  %12s  %s", $1, $2, $3, $4, $5, $6, $7}')")
}

for s in "${SCENARIOS[@]}"; do
    run_attack "$s"
done

echo "== attacks against $SERVER, ${ATTACK_DURATION}s each; outputs in $ATTACK_DIR"
printf '%-27s  %9s  %9s  %9s  %8s  %12s  %s\n' attack p99_ms max_ms lost peak_mb login_ms extras
printf '%s\n' "${SUMMARY[@]}"
