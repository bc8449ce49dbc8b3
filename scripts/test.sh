#!/usr/bin/env bash
# The test command: installs what the tests need when it is missing, then runs the format
# check, clippy (warnings are errors), every test, and the checks of deploy/ (Kubernetes
# schemas, systemd-analyze verify, compose and HAProxy config). Non-interactive; runs every
# check and exits non-zero if any failed. Run from anywhere: `bash scripts/test.sh`.
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

# ensure_node WHAT MIN: a Node.js of major version MIN or newer, and npm, first on the PATH.
# Debian's own nodejs and npm are installed when missing; when that node is older than MIN
# (bookworm has 18), a pinned Node (LOCAL_NODE_VERSION) is installed from the npm registry into
# .tools/ (the node-linux-<arch> package: the official binary, no install script) and put first
# on the PATH — of the calling step only, as the steps run in subshells. Else fails saying what
# to install for WHAT.
LOCAL_NODE_VERSION=22.23.5
ensure_node() {
    local what="$1" min="$2"
    (ensure_pkg node nodejs && ensure_pkg npm npm) || {
        printf 'error: %s needs Node.js %s+ and npm: install nodejs and npm\n' "$what" "$min" >&2
        return 1
    }
    if [ "$(node_major)" -ge "$min" ]; then
        return 0
    fi
    local arch dir="$PWD/.tools/node-$LOCAL_NODE_VERSION"
    case "$(uname -m)" in
        x86_64) arch=x64 ;;
        aarch64) arch=arm64 ;;
        *) printf 'error: %s needs Node.js %s+ (found %s): install it\n' "$what" "$min" "$(node --version)" >&2
           return 1 ;;
    esac
    if [ ! -x "$dir/node_modules/node-linux-$arch/bin/node" ]; then
        log "installing Node.js $LOCAL_NODE_VERSION into $dir (system node is $(node --version); $what needs $min+)"
        npm install --prefix "$dir" --no-save --no-audit --no-fund \
            "node-linux-$arch@$LOCAL_NODE_VERSION" </dev/null || {
            printf 'error: %s needs Node.js %s+ (found %s) and installing %s from npm failed: install nodejs %s+\n' \
                "$what" "$min" "$(node --version)" "node-linux-$arch@$LOCAL_NODE_VERSION" "$min" >&2
            return 1
        }
    fi
    PATH="$dir/node_modules/node-linux-$arch/bin:$PATH"
    printf 'using %s for %s\n' "$(command -v node)" "$what" >&2
}

node_major() {
    node -p 'process.versions.node.split(".")[0]' 2>/dev/null || echo 0
}

# console_test: the web console's end-to-end test (tests/console): the built binary, Debian's
# chromium driven by playwright-core from npm (no browser download). Installs what it needs;
# when it cannot, the step fails saying what to install (it never skips).
# playwright-core 1.65 refuses Node 18 ("Playwright requires Node.js 20 or higher").
console_test() (
    ensure_node "the console test" 20 || return 1
    (ensure_pkg chromium) || {
        printf 'error: the console test needs a browser: install the chromium package (apt-get install chromium)\n' >&2
        return 1
    }
    if [ ! -d tests/console/node_modules/playwright-core ]; then
        npm ci --prefix tests/console --no-audit --no-fund </dev/null || return 1
    fi
    cargo build --locked --bin jssocket || return 1
    CHROMIUM="$(command -v chromium)" bounded node --test tests/console/console.test.mjs
)

# signalr_test: the SignalR endpoint's end-to-end test (tests/signalr): the built binary and
# the real @microsoft/signalr client (pinned in tests/signalr/package-lock.json). Installs
# what it needs; when it cannot, the step fails saying what to install (it never skips).
signalr_test() (
    ensure_node "the SignalR test" 18 || return 1
    if [ ! -d tests/signalr/node_modules/@microsoft/signalr ]; then
        npm ci --prefix tests/signalr --no-audit --no-fund </dev/null || return 1
    fi
    cargo build --locked --bin jssocket || return 1
    bounded node --test tests/signalr/signalr.test.mjs
)

# client_js_test: jssocket-client (clients/js) against the built binary, with `ws` as the
# WebSocket of Node 18 and 20 (pinned in clients/js/package-lock.json); also fails when the committed
# browser bundle (dist/, embedded by the server) is not what src/index.js gives.
client_js_test() (
    ensure_node "the JavaScript client test" 18 || return 1
    if [ ! -d clients/js/node_modules/ws ]; then
        npm ci --prefix clients/js --no-audit --no-fund </dev/null || return 1
    fi
    node clients/js/build.mjs --check || return 1
    cargo build --locked --bin jssocket || return 1
    bounded node --test clients/js/test/*.test.mjs
)

# kubernetes-validate (PyPI) ships the Kubernetes schemas, so it validates offline. Pinned; in
# a virtualenv under .tools/ so that nothing is installed into the system Python.
KUBE_VALIDATE_VERSION=1.37.0
KUBE_VALIDATE="$PWD/.tools/kubernetes-validate-$KUBE_VALIDATE_VERSION/bin/kubernetes-validate"

# ensure_kube_validate: kubernetes-validate in its virtualenv, installed when missing.
ensure_kube_validate() {
    [ -x "$KUBE_VALIDATE" ] && return 0
    (ensure_pkg python3) || return 1
    local venv="${KUBE_VALIDATE%/bin/*}"
    rm -rf "$venv"
    if ! python3 -m venv "$venv" >/dev/null 2>&1; then
        # Debian's python3 has no venv module without python3-venv.
        rm -rf "$venv"
        log "installing python3-venv (for kubernetes-validate)"
        as_root apt-get update -qq </dev/null &&
            as_root apt-get install -y -qq --no-install-recommends python3-venv </dev/null &&
            python3 -m venv "$venv" || {
            printf 'error: validating the manifests needs python3 with venv: install python3-venv\n' >&2
            return 1
        }
    fi
    log "installing kubernetes-validate $KUBE_VALIDATE_VERSION from PyPI into $venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check \
        "kubernetes-validate==$KUBE_VALIDATE_VERSION" </dev/null || {
        printf 'error: could not install kubernetes-validate %s from PyPI (pip install kubernetes-validate==%s)\n' \
            "$KUBE_VALIDATE_VERSION" "$KUBE_VALIDATE_VERSION" >&2
        return 1
    }
}

# kubernetes_test: every manifest in deploy/kubernetes against the schemas of Kubernetes 1.37,
# strict (an unknown or misspelt field fails, not just a wrong type).
kubernetes_test() {
    ensure_kube_validate || return 1
    "$KUBE_VALIDATE" --strict deploy/kubernetes/*.yaml
}

# systemd_test: `systemd-analyze verify` of deploy/systemd/jssocket.service. verify wants the
# unit's programs to exist, so it checks a copy whose /usr/local/bin/jssocket is the built
# binary. It exits 0 on an unknown key or a bad value (only a warning), so any output fails.
# Works without systemd running as PID 1 (containers).
systemd_test() {
    (ensure_pkg systemd-analyze systemd) || {
        printf 'error: checking the systemd unit needs systemd-analyze: install the systemd package\n' >&2
        return 1
    }
    cargo build --locked --bin jssocket || return 1
    local dir out status=0
    dir="$(mktemp -d)"
    sed "s|/usr/local/bin/jssocket|$PWD/target/debug/jssocket|g" deploy/systemd/jssocket.service \
        >"$dir/jssocket.service"
    out="$(systemd-analyze verify "$dir/jssocket.service" 2>&1)" || status=$?
    rm -rf "$dir"
    if [ "$status" -ne 0 ] || [ -n "$out" ]; then
        printf '%s\nerror: systemd-analyze verify deploy/systemd/jssocket.service: see above\n' "$out" >&2
        return 1
    fi
    printf 'systemd-analyze verify deploy/systemd/jssocket.service: no warnings\n' >&2
}

# compose_test: deploy/compose.yaml with `docker compose config` when Docker Compose is here
# (it is not run: that needs the images), else parsed as YAML and its services checked; and
# deploy/haproxy.cfg with `haproxy -c`, where only the node names may fail to resolve (they
# exist in the compose network only).
compose_test() {
    if docker compose version >/dev/null 2>&1; then
        docker compose -f deploy/compose.yaml config -q || return 1
        printf 'docker compose config: ok\n' >&2
    else
        ensure_kube_validate || return 1
        # The kubernetes-validate virtualenv has PyYAML.
        "${KUBE_VALIDATE%/*}/python" - deploy/compose.yaml <<'PY' || return 1
import os, sys, yaml
path = sys.argv[1]
doc = yaml.safe_load(open(path))
services = doc.get("services") or {}
want = {"jssocket-1", "jssocket-2", "jssocket-3", "redis", "lb"}
missing = want - services.keys()
assert not missing, f"{path}: services missing: {sorted(missing)}"
base = os.path.dirname(path)
for name in ("jssocket-1", "jssocket-2", "jssocket-3"):
    svc = services[name]
    ctx = os.path.join(base, svc["build"]["context"])
    assert os.path.isfile(os.path.join(ctx, svc["build"]["dockerfile"])), f"{name}: no Dockerfile in {ctx}"
    assert svc["environment"]["SOCKET_REDIS_URL"] == "redis://redis:6379", name
for volume in services["lb"]["volumes"]:
    source = os.path.join(base, volume.split(":")[0])
    assert os.path.isfile(source), f"lb: {source} does not exist"
print(f"{path}: YAML parsed, {len(services)} services checked (docker compose is not installed: not run)", file=sys.stderr)
PY
    fi
    (ensure_pkg haproxy) || {
        printf 'error: checking deploy/haproxy.cfg needs haproxy: install the haproxy package\n' >&2
        return 1
    }
    local out status=0
    out="$(haproxy -c -f deploy/haproxy.cfg 2>&1)" || status=$?
    printf '%s\n' "$out" >&2
    if [ "$status" -ne 0 ] ||
        printf '%s\n' "$out" | grep -E 'WARNING|ALERT' | grep -vq 'could not resolve address'; then
        printf 'error: haproxy -c -f deploy/haproxy.cfg: see above\n' >&2
        return 1
    fi
}

FAILED=()
# step NAME COMMAND...: runs one check and records a failure, so one run reports every broken
# check (callers go on with `|| true`); the script still exits non-zero at the end. Its last
# line says how long it took, so a slow step stands out.
step() {
    local name="$1" status=0 start=$SECONDS
    shift
    log "$name"
    "$@" || status=$?
    if [ "$status" -ne 0 ]; then
        FAILED+=("$name")
        printf '\n==> FAILED: %s (%s)\n' "$name" "$(elapsed "$start")" >&2
    else
        printf '==> ok: %s (%s)\n' "$name" "$(elapsed "$start")" >&2
    fi
    return "$status"
}

# elapsed START: the time since START (a value of $SECONDS), as 42s or 3m05s.
elapsed() {
    local s=$((SECONDS - $1))
    if [ "$s" -ge 60 ]; then
        printf '%dm%02ds' $((s / 60)) $((s % 60))
    else
        printf '%ds' "$s"
    fi
}

# announce_installs FULL: says up front what this run will install because it is missing
# (FULL=1: the whole suite, with the browser, Node and deploy checks), so a long first run
# is not a surprise.
announce_installs() {
    local full="$1" missing=()
    cargo fmt --version >/dev/null 2>&1 || missing+=("the rustfmt component")
    cargo clippy --version >/dev/null 2>&1 || missing+=("the clippy component")
    command -v cc >/dev/null 2>&1 || missing+=("build-essential")
    command -v redis-server >/dev/null 2>&1 || missing+=("redis-server")
    command -v redis-cli >/dev/null 2>&1 || missing+=("redis-tools")
    if [ "$full" -eq 1 ]; then
        command -v node >/dev/null 2>&1 || missing+=("nodejs")
        command -v npm >/dev/null 2>&1 || missing+=("npm")
        if [ "$(node_major)" -lt 20 ] &&
            [ ! -d ".tools/node-$LOCAL_NODE_VERSION" ]; then
            missing+=("Node.js $LOCAL_NODE_VERSION from npm into .tools/ (~185 MB unpacked; the console test needs 20+)")
        fi
        command -v chromium >/dev/null 2>&1 || missing+=("chromium (~350 MB with its libraries)")
        local dir
        for dir in tests/console tests/signalr clients/js; do
            [ -d "$dir/node_modules" ] || missing+=("npm packages of $dir")
        done
        [ -x "$KUBE_VALIDATE" ] || missing+=("kubernetes-validate $KUBE_VALIDATE_VERSION from PyPI into .tools/ (~150 MB with its schemas)")
        command -v systemd-analyze >/dev/null 2>&1 || missing+=("systemd (for systemd-analyze)")
        command -v haproxy >/dev/null 2>&1 || missing+=("haproxy (to check deploy/haproxy.cfg)")
    fi
    if [ "${#missing[@]}" -gt 0 ]; then
        log "will install: $(IFS=,; printf '%s' "${missing[*]}" | sed 's/,/, /g')"
    fi
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
    local full=1
    [ "$#" -eq 0 ] || full=0
    announce_installs "$full"
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
        step "Kubernetes manifests (kubernetes-validate deploy/kubernetes)" kubernetes_test || true
        step "systemd unit (systemd-analyze verify deploy/systemd)" systemd_test || true
        step "compose demo (deploy/compose.yaml, deploy/haproxy.cfg)" compose_test || true
    fi

    if [ "${#FAILED[@]}" -gt 0 ]; then
        printf '\n==> %d check(s) failed (in %s):\n' "${#FAILED[@]}" "$(elapsed 0)" >&2
        printf '    - %s\n' "${FAILED[@]}" >&2
        exit 1
    fi
    log "all checks passed (in $(elapsed 0))"
}

main "$@"
