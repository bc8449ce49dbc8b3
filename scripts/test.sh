#!/usr/bin/env bash
# The test command: installs what the tests need when it is missing, then runs the format
# check, clippy (warnings are errors) and every test. Non-interactive; runs every check and
# exits non-zero if any failed. Run from anywhere: `bash scripts/test.sh`.
#
# Extra arguments are passed to `cargo test` (e.g. `bash scripts/test.sh --test cli`).
# TEST_TIMEOUT (seconds, default 900) bounds how long the tests may run once built.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

export DEBIAN_FRONTEND=noninteractive
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-auto}"

log() { printf '\n==> %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# Runs a command as root: directly when we are root, through sudo otherwise.
as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo -n "$@"
    else
        die "need root (or sudo) to run: $*"
    fi
}

APT_UPDATED=0
# ensure_pkg COMMAND [PACKAGE...]: installs PACKAGE(s) (default: COMMAND) with apt-get
# unless COMMAND is already on the PATH. `apt-get update` runs at most once per run.
ensure_pkg() {
    local cmd="$1"
    shift
    local pkgs=("$@")
    [ "${#pkgs[@]}" -gt 0 ] || pkgs=("$cmd")
    if command -v "$cmd" >/dev/null 2>&1; then
        return 0
    fi
    command -v apt-get >/dev/null 2>&1 || die "$cmd is missing and apt-get is not available; install ${pkgs[*]}"
    log "installing ${pkgs[*]} (for $cmd)"
    if [ "$APT_UPDATED" -eq 0 ]; then
        as_root apt-get update -qq </dev/null
        APT_UPDATED=1
    fi
    as_root apt-get install -y -qq --no-install-recommends "${pkgs[@]}" </dev/null
    command -v "$cmd" >/dev/null 2>&1 || die "installed ${pkgs[*]} but $cmd is still missing"
}

# ensure_rust_component NAME: rustfmt and clippy come with rustup's default profile, but a
# minimal toolchain lacks them.
ensure_rust_component() {
    local component="$1" probe="$2"
    if cargo "$probe" --version >/dev/null 2>&1; then
        return 0
    fi
    command -v rustup >/dev/null 2>&1 || die "cargo $probe is missing and rustup is not available"
    log "installing the $component component"
    rustup component add "$component" </dev/null
}

ensure_tools() {
    command -v cargo >/dev/null 2>&1 || die "cargo is missing: install the Rust toolchain (https://rustup.rs)"
    ensure_rust_component rustfmt fmt
    ensure_rust_component clippy clippy
    # A C compiler and linker, for crates with build scripts.
    ensure_pkg cc build-essential
    ensure_pkg timeout coreutils
    # The cluster tests (tests/cluster.rs) and the JavaScript client's storm test
    # (clients/js/test/storm.test.mjs) start their own redis-server.
    ensure_pkg redis-server
    # The Redis Cluster tests make their cluster with redis-cli.
    ensure_pkg redis-cli redis-tools
    # (chromium, node and npm: console_test ensures them, so that only its step fails.)
}

# ensure_node WHAT: Node.js 20+ and npm, installed when missing; else fails saying what to
# install for WHAT.
ensure_node() {
    local what="$1"
    (ensure_pkg node nodejs && ensure_pkg npm npm) || {
        printf 'error: %s needs Node.js 20+ and npm: install nodejs and npm\n' "$what" >&2
        return 1
    }
    local major
    major="$(node -p 'process.versions.node.split(".")[0]')"
    if [ "${major:-0}" -lt 20 ]; then
        printf 'error: %s needs Node.js 20+ (found %s): install nodejs 20 or newer\n' \
            "$what" "$(node --version)" >&2
        return 1
    fi
}

# console_test: the web console's end-to-end test (tests/console): the built binary, Debian's
# chromium driven by playwright-core from npm (no browser download). Installs what it needs;
# when it cannot, the step fails saying what to install (it never skips).
console_test() {
    ensure_node "the console test" || return 1
    (ensure_pkg chromium) || {
        printf 'error: the console test needs a browser: install the chromium package (apt-get install chromium)\n' >&2
        return 1
    }
    if [ ! -d tests/console/node_modules/playwright-core ]; then
        npm ci --prefix tests/console --no-audit --no-fund </dev/null || return 1
    fi
    cargo build --locked --bin jssocket || return 1
    CHROMIUM="$(command -v chromium)" bounded node --test tests/console/console.test.mjs
}

# signalr_test: the SignalR endpoint's end-to-end test (tests/signalr): the built binary and
# the real @microsoft/signalr client (pinned in tests/signalr/package-lock.json). Installs
# what it needs; when it cannot, the step fails saying what to install (it never skips).
signalr_test() {
    ensure_node "the SignalR test" || return 1
    if [ ! -d tests/signalr/node_modules/@microsoft/signalr ]; then
        npm ci --prefix tests/signalr --no-audit --no-fund </dev/null || return 1
    fi
    cargo build --locked --bin jssocket || return 1
    bounded node --test tests/signalr/signalr.test.mjs
}

# client_js_test: jssocket-client (clients/js) against the built binary, with `ws` as the
# WebSocket of Node 20 (pinned in clients/js/package-lock.json); also fails when the committed
# browser bundle (dist/, embedded by the server) is not what src/index.js gives.
client_js_test() {
    ensure_node "the JavaScript client test" || return 1
    if [ ! -d clients/js/node_modules/ws ]; then
        npm ci --prefix clients/js --no-audit --no-fund </dev/null || return 1
    fi
    node clients/js/build.mjs --check || return 1
    cargo build --locked --bin jssocket || return 1
    bounded node --test clients/js/test/*.test.mjs
}

FAILED=()
# step NAME COMMAND...: runs one check and records a failure, so one run reports every broken
# check (callers go on with `|| true`); the script still exits non-zero at the end.
step() {
    local name="$1" status=0
    shift
    log "$name"
    "$@" || status=$?
    if [ "$status" -ne 0 ]; then
        FAILED+=("$name")
        printf '\n==> FAILED: %s\n' "$name" >&2
    fi
    return "$status"
}

# Seconds the tests may run. libtest has no per-test timeout, so a test that hangs would hang
# CI; this bounds it. The build is not counted: `cargo test --no-run` runs first, unbounded.
TEST_TIMEOUT="${TEST_TIMEOUT:-900}"

# bounded COMMAND...: runs the tests under `timeout`, which puts
# them in a process group of its own. When they end (or time runs out) whatever is left in
# that group — a server a killed test could not stop — is killed too.
bounded() {
    local status=0 pid
    timeout --kill-after=30 "$TEST_TIMEOUT" "$@" </dev/null &
    pid=$!
    trap 'kill -TERM -- "-$pid" 2>/dev/null' INT TERM
    wait "$pid" || status=$?
    trap - INT TERM
    kill -KILL -- "-$pid" 2>/dev/null || true
    if [ "$status" -eq 124 ] || [ "$status" -eq 137 ]; then
        printf 'error: tests still running after %ss (TEST_TIMEOUT): a test hangs\n' "$TEST_TIMEOUT" >&2
    fi
    return "$status"
}

main() {
    ensure_tools

    step "cargo fmt --check" cargo fmt --all -- --check || true
    # --workspace: the server and the bench (bench/).
    step "cargo clippy --workspace --all-targets -- -D warnings" \
        cargo clippy --workspace --all-targets --locked -- -D warnings || true
    if [ "$#" -gt 0 ]; then
        # `--no-run` right after `cargo test`, before any `--` that starts the binary's args.
        step "build tests" cargo test --locked --no-run "$@" &&
            step "cargo test $*" bounded cargo test --locked "$@" || true
    else
        # --no-fail-fast: every test binary runs even when an earlier one fails.
        step "build tests" cargo test --workspace --all-targets --locked --no-run &&
            step "cargo test --workspace --all-targets" \
                bounded cargo test --workspace --all-targets --locked --no-fail-fast || true
        # --all-targets leaves out doctests; they run here.
        step "cargo test --doc" bounded cargo test --doc --locked || true
        step "console browser test (node --test tests/console)" console_test || true
        step "SignalR client test (node --test tests/signalr)" signalr_test || true
        step "JavaScript client test (node --test clients/js/test)" client_js_test || true
    fi

    if [ "${#FAILED[@]}" -gt 0 ]; then
        printf '\n==> %d check(s) failed:\n' "${#FAILED[@]}" >&2
        printf '    - %s\n' "${FAILED[@]}" >&2
        exit 1
    fi
    log "all checks passed"
}

main "$@"
