#!/usr/bin/env bash
# Builds the Debian/Ubuntu package: target/debian/sealpipe_VERSION-1_ARCH.deb
# (binary in /usr/bin, systemd units, sysusers, example config, completions, man pages; the
# layout is [package.metadata.deb] in Cargo.toml). Install it with
#   apt install ./target/debian/sealpipe_*.deb
#
# usage: scripts/package-deb.sh [--profile PROFILE] [--list]
#   --profile  cargo profile of the binary (default release; CI packages its dev build)
#   --list     print the package's files after building it (dpkg-deb --contents)
# Installs cargo-deb from crates.io (cargo install --locked) if it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
profile=release list=0
while [ $# -gt 0 ]; do
  case $1 in
    --profile) profile=$2; shift 2 ;;
    --list) list=1; shift ;;
    *) echo "usage: $0 [--profile PROFILE] [--list]" >&2; exit 2 ;;
  esac
done
dir=$profile; [ "$profile" = dev ] && dir=debug
command -v cargo-deb >/dev/null || cargo install cargo-deb --locked --version '^3'
cargo build --locked --profile "$profile" --package sealpipe --bin sealpipe
bin=target/$dir/sealpipe
# Completions and manual pages come from the binary (the flags are their only source).
assets=target/assets
rm -rf "$assets" && mkdir -p "$assets/completions" "$assets/man"
"$bin" completions bash > "$assets/completions/sealpipe"
"$bin" completions zsh > "$assets/completions/_sealpipe"
"$bin" completions fish > "$assets/completions/sealpipe.fish"
"$bin" man --dir "$assets/man"
gzip -9n "$assets"/man/*.1
deb=$(cargo deb --no-build --profile "$profile" --package sealpipe --output target/debian/ 2>&1 | tail -n1)
echo "$deb"
if [ "$list" = 1 ]; then dpkg-deb --info "$deb" | sed -n '/Package:/,$p'; dpkg-deb --contents "$deb"; fi
