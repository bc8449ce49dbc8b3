#!/usr/bin/env bash
# Builds jssocket in release mode and installs the binary onto the PATH:
# /usr/local/bin when writable, else ~/.cargo/bin, else ~/.local/bin.
# Idempotent: running it again rebuilds if needed and replaces the binary.
# Override the destination with INSTALL_DIR=/some/dir ./install.sh
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")"

command -v cargo >/dev/null 2>&1 || {
    echo "error: cargo is missing: install the Rust toolchain first (https://rustup.rs)" >&2
    exit 1
}

echo "==> cargo build --release --locked"
cargo build --release --locked

target_dir="$(cargo metadata --format-version 1 --no-deps 2>/dev/null \
    | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')"
binary="${target_dir:-target}/release/jssocket"
[ -x "$binary" ] || { echo "error: $binary was not built" >&2; exit 1; }

pick_dir() {
    if [ -n "${INSTALL_DIR:-}" ]; then
        echo "$INSTALL_DIR"
    elif [ -d /usr/local/bin ] && [ -w /usr/local/bin ]; then
        echo /usr/local/bin
    elif [ -d "$HOME/.cargo/bin" ] && [ -w "$HOME/.cargo/bin" ]; then
        echo "$HOME/.cargo/bin"
    else
        echo "$HOME/.local/bin"
    fi
}
dest_dir="$(pick_dir)"
mkdir -p "$dest_dir"
dest="$dest_dir/jssocket"

# Copy next to the destination and rename over it: atomic, and works while an old
# jssocket is running from that path ("text file busy" otherwise).
tmp="$(mktemp "$dest_dir/.jssocket.XXXXXX")"
trap 'rm -f "$tmp"' EXIT
cp "$binary" "$tmp"
chmod 0755 "$tmp"
mv -f "$tmp" "$dest"
trap - EXIT

echo "==> installed $dest"
"$dest" --version

case ":$PATH:" in
    *":$dest_dir:"*)
        found="$(command -v jssocket 2>/dev/null || true)"
        if [ "$found" != "$dest" ]; then
            echo "note: \`jssocket\` resolves to $found, which comes before $dest on your PATH" >&2
        fi
        ;;
    *) echo "note: $dest_dir is not on your PATH; add it, e.g. export PATH=\"$dest_dir:\$PATH\"" >&2 ;;
esac
