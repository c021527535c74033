#!/usr/bin/env bash
# Makes CRIU >= 4.1 available to Ferry's whole-process migration (issue 13)
# and prints the path of the criu to use. Run as root; idempotent and quick
# once done.
#
# - A system criu >= 4.1 (Debian 13 and later: `apt-get install criu`) is used
#   as it is.
# - Otherwise (Debian 12 ships 3.17, which fails on kernels >= 6.13 with
#   "vdso: Unexpected rt vDSO area bounds") Debian 13's criu, its libraries and
#   its libc6 are unpacked into a private prefix, .build/criu/root, with a
#   separate sources list and lists directory: the system's apt configuration,
#   package lists and installed packages are untouched. A wrapper,
#   .build/criu/criu, runs it through the prefix's own dynamic loader.
# - fs.pipe-max-size is raised to 4 MiB: CRIU's lazy dump splices each VMA's
#   pages into a pipe it sizes up to that; root here lacks CAP_SYS_RESOURCE
#   (which would let it exceed the limit), and with the default 1 MiB the
#   dump fails.
set -euo pipefail
cd "$(dirname "$0")/.."
root_dir=$PWD
prefix="$root_dir/.build/criu"
wrapper="$prefix/criu"
want_major=4 want_minor=1
pipe_max=$((4 * 1024 * 1024))

if (( $(cat /proc/sys/fs/pipe-max-size) < pipe_max )); then
    sysctl -q -w fs.pipe-max-size=$pipe_max
fi

new_enough() { # criu binary → 0 when its version is >= 4.1
    local v
    v=$("$@" --version 2>/dev/null | sed -n 's/^Version: *//p') || return 1
    [[ -n $v ]] || return 1
    local major=${v%%.*} rest=${v#*.}
    local minor=${rest%%.*}
    (( major > want_major || (major == want_major && minor >= want_minor) ))
}

if command -v criu >/dev/null && new_enough criu; then
    command -v criu
    exit 0
fi
if [[ -x $wrapper ]] && new_enough "$wrapper"; then
    echo "$wrapper"
    exit 0
fi

echo "setup-criu: installing Debian 13's criu into $prefix" >&2
state="$prefix/apt"
mkdir -p "$state/lists/partial" "$state/archives/partial" "$prefix/debs" "$prefix/root"
cat > "$state/sources.list" <<SOURCES
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian trixie main
SOURCES
: > "$state/status"
apt_opts=(
    -o Dir::Etc::SourceList="$state/sources.list"
    -o Dir::Etc::SourceParts=/dev/null
    -o Dir::State::Lists="$state/lists"
    -o Dir::State::Status="$state/status"
    -o Dir::Cache="$state/cache"
    -o Dir::Cache::Archives="$state/archives"
    -o APT::Architecture=amd64
    -o Debug::NoLocking=true
    -o APT::Sandbox::User=root
)
mkdir -p "$state/cache"
apt-get "${apt_opts[@]}" update -qq
# criu and what its binary links against, plus the libc6 it was built for.
packages=(criu libc6 libprotobuf-c1 libnl-3-200 libnet1 libnftables1 libnftnl11
          libmnl0 libxtables12 libjansson4 libgnutls30t64 libbsd0 libmd0 libuuid1
          libgmp10 libnettle8t64 libhogweed6t64 libidn2-0 libp11-kit0 libtasn1-6
          libunistring5 libffi8)
(cd "$prefix/debs" && rm -f ./*.deb && apt-get "${apt_opts[@]}" download "${packages[@]}" >/dev/null)
for deb in "$prefix"/debs/*.deb; do
    dpkg-deb -x "$deb" "$prefix/root"
done
lib="$prefix/root/usr/lib/x86_64-linux-gnu"
cat > "$wrapper" <<WRAPPER
#!/bin/sh
# Debian 13's criu from a private prefix (Tools/setup-criu.sh), run through
# the prefix's own loader so it uses the libc it was built for.
exec "$lib/ld-linux-x86-64.so.2" --library-path "$lib" "$prefix/root/usr/sbin/criu" "\$@"
WRAPPER
chmod +x "$wrapper"
if ! new_enough "$wrapper"; then
    echo "setup-criu: $wrapper does not run:" >&2
    "$wrapper" --version >&2 || true
    exit 1
fi
echo "$wrapper"
