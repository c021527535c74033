#!/usr/bin/env bash
# Installs what building Ferry needs on Debian 12, only when missing:
# libsodium-dev, libuv1-dev and libzstd-dev (pkg-config finds them). Run as root.
set -euo pipefail
need=()
for pkg in libsodium-dev libuv1-dev libzstd-dev pkg-config "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need+=("$pkg")
done
if ((${#need[@]})); then
    echo "setup: installing ${need[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${need[@]}" >/dev/null
fi
