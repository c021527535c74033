#!/usr/bin/env bash
# Makes CRIU >= 4.1 available to Ferry's whole-process migration (issue 13)
# and prints the path of the criu to use. Run as root; idempotent and quick
# once done.
#
# - A system criu >= 4.2 is used as it is.
# - Otherwise Debian's newest criu (unstable's: 4.2.1 when written), its
#   libraries and its libc6 are unpacked into a private prefix,
#   .build/criu/root, with a separate sources list and lists directory: the
#   system's apt configuration, package lists and installed packages are
#   untouched. A wrapper, .build/criu/criu, runs it through the prefix's own
#   dynamic loader. Why not older ones: Debian 12's 3.17 fails on kernels
#   >= 6.13 ("vdso: Unexpected rt vDSO area bounds"); Debian 13's 4.1.1 runs,
#   but cannot dump a TCP or UDP socket on recent kernels, which refuse
#   SO_PASSCRED/SO_PASSSEC on them ("Can't get 1:16 opt: Operation not
#   supported"; fixed in CRIU 4.2). Ferry itself accepts 4.1 and later.
#   FERRY_CRIU_SUITE picks another Debian suite (trixie: 4.1.1).
# - fs.pipe-max-size is raised to 4 MiB: CRIU's lazy dump splices each VMA's
#   pages into a pipe it sizes up to that; root here lacks CAP_SYS_RESOURCE
#   (which would let it exceed the limit), and with the default 1 MiB the
#   dump fails.
set -euo pipefail
cd "$(dirname "$0")/.."
root_dir=$PWD
prefix="$root_dir/.build/criu"
wrapper="$prefix/criu"
want_major=4
pipe_max=$((4 * 1024 * 1024))

if (( $(cat /proc/sys/fs/pipe-max-size) < pipe_max )); then
    sysctl -q -w fs.pipe-max-size=$pipe_max
fi

new_enough() { # MINOR criu-command... → 0 when its version is >= 4.MINOR
    local want_minor=$1 v
    shift
    v=$("$@" --version 2>/dev/null | sed -n 's/^Version: *//p') || return 1
    [[ -n $v ]] || return 1
    local major=${v%%.*} rest=${v#*.}
    local minor=${rest%%.*}
    (( major > want_major || (major == want_major && minor >= want_minor) ))
}

if command -v criu >/dev/null && new_enough 2 criu; then
    command -v criu
    exit 0
fi
if [[ -x $wrapper ]] && [[ $(cat "$prefix/suite" 2>/dev/null) == "${FERRY_CRIU_SUITE:-sid}" ]] && new_enough 1 "$wrapper"; then
    echo "$wrapper"
    exit 0
fi

suite=${FERRY_CRIU_SUITE:-sid}
echo "setup-criu: installing criu from Debian $suite into $prefix" >&2
state="$prefix/apt"
mkdir -p "$state/lists/partial" "$state/archives/partial" "$prefix/debs" "$prefix/root"
cat > "$state/sources.list" <<SOURCES
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian $suite main
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
# criu and everything it depends on, libc6 included (the prefix is self-contained).
mapfile -t packages < <(apt-cache "${apt_opts[@]}" depends --recurse --no-recommends --no-suggests \
    --no-conflicts --no-breaks --no-replaces --no-enhances --no-pre-depends criu | grep -E '^[a-z0-9]' | sort -u)
(cd "$prefix/debs" && rm -f ./*.deb && apt-get "${apt_opts[@]}" download "${packages[@]}" >/dev/null)
for deb in "$prefix"/debs/*.deb; do
    dpkg-deb -x "$deb" "$prefix/root"
done
lib="$prefix/root/usr/lib/x86_64-linux-gnu"
cat > "$wrapper" <<WRAPPER
#!/bin/sh
# Debian's criu ($suite) from a private prefix (Tools/setup-criu.sh), run through
# the prefix's own loader so it uses the libc it was built for.
exec "$lib/ld-linux-x86-64.so.2" --library-path "$lib" "$prefix/root/usr/sbin/criu" "\$@"
WRAPPER
chmod +x "$wrapper"
echo "$suite" > "$prefix/suite"
if ! new_enough 1 "$wrapper"; then
    echo "setup-criu: $wrapper does not run:" >&2
    "$wrapper" --version >&2 || true
    exit 1
fi
echo "$wrapper"
