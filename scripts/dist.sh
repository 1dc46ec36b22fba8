#!/usr/bin/env bash
# Builds a release binary for shipping: `dist/weir` stripped (a few MB instead of ~90 MB with
# the release profile's debug info) and `dist/weir.debug` with its symbols, linked by a
# .gnu_debuglink so gdb and perf find them when both files sit side by side. The version
# (`weir --version`, SHOW VERSION) is `git describe --tags` of the checkout.
#
#   bash scripts/dist.sh            # writes dist/weir and dist/weir.debug
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked --bin weir
mkdir -p dist
rm -f dist/weir dist/weir.debug
objcopy --only-keep-debug target/release/weir dist/weir.debug
objcopy --strip-debug --strip-unneeded --add-gnu-debuglink=dist/weir.debug \
    target/release/weir dist/weir
chmod 0755 dist/weir
echo "dist/weir: $(du -h dist/weir | cut -f1) ($(dist/weir --version)); symbols in dist/weir.debug ($(du -h dist/weir.debug | cut -f1))"
