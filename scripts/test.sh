#!/usr/bin/env bash
# The test command: installs what the tests need when it is missing, then runs the format
# check, clippy (warnings are errors) and every test. Non-interactive; runs every check and
# exits non-zero if any failed. Run from anywhere: `bash scripts/test.sh`.
#
# Extra arguments are passed to `cargo test` (e.g. `bash scripts/test.sh --test cli`).
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
    # Later steps add their needs here, for example:
    #   ensure_pkg redis-server
    #   ensure_pkg chromium
    #   ensure_pkg npm nodejs npm && (cd web && npm ci)
}

FAILED=()
# step NAME COMMAND...: runs one check, records its failure and carries on, so one run
# reports every broken check; the script still exits non-zero at the end.
step() {
    local name="$1"
    shift
    log "$name"
    if ! "$@"; then
        FAILED+=("$name")
        printf '\n==> FAILED: %s\n' "$name" >&2
    fi
}

main() {
    ensure_tools

    step "cargo fmt --check" cargo fmt --all -- --check
    step "cargo clippy --all-targets -- -D warnings" \
        cargo clippy --all-targets --locked -- -D warnings
    if [ "$#" -gt 0 ]; then
        step "cargo test $*" cargo test --locked "$@"
    else
        # --no-fail-fast: every test binary runs even when an earlier one fails.
        step "cargo test --all-targets" cargo test --all-targets --locked --no-fail-fast
        # --all-targets leaves out doctests; they run here.
        step "cargo test --doc" cargo test --doc --locked
    fi

    if [ "${#FAILED[@]}" -gt 0 ]; then
        printf '\n==> %d check(s) failed:\n' "${#FAILED[@]}" >&2
        printf '    - %s\n' "${FAILED[@]}" >&2
        exit 1
    fi
    log "all checks passed"
}

main "$@"
