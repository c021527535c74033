#!/usr/bin/env bash
# Installs Ferry under a prefix: the three commands, their man pages and
# their bash, zsh and fish completions (both generated from the commands'
# own argument parser), and a systemd unit running `hub serve`.
set -euo pipefail

tools=(seeder leecher hub)
me=install.sh
here=$(cd "$(dirname "$0")" && pwd)   # Tools/

usage() {
    cat <<'EOF'
usage: Tools/install.sh [options] PREFIX

Installs Ferry under PREFIX (an absolute path, e.g. /usr/local):

  PREFIX/bin/{seeder,leecher,hub}
  PREFIX/share/man/man1/               one page per command and subcommand
                                       (man leecher, man leecher pull, ...)
  PREFIX/share/bash-completion/completions/{seeder,leecher,hub}
  PREFIX/share/zsh/site-functions/_{seeder,leecher,hub}
  PREFIX/share/fish/vendor_completions.d/{seeder,leecher,hub}.fish
  UNIT-DIR/ferry-hub.service           `hub serve` as a system service
  SYSCONFDIR/ferry/hub.env             its listen address and options (kept if present)
  SYSCONFDIR/ferry/hub/                root-only directory for its credentials

Without --from it builds release binaries first, with the Swift runtime linked
in (swift build -c release --static-swift-stdlib, in .build-install): they run
on hosts without the Swift toolchain, given libsodium23 and libuv1.

options:
  --from DIR          install the binaries already built in DIR (what
                      `swift build --show-bin-path` prints) instead of building;
                      DIR must hold seeder, leecher, hub and ferry-manual
  --unit-dir DIR      where the unit goes (default: PREFIX/lib/systemd/system;
                      systemd reads /usr/local/lib/systemd/system and /etc/systemd/system)
  --sysconfdir DIR    configuration the unit reads (default: /etc for the
                      prefixes /usr and /usr/local, PREFIX/etc otherwise)
  --hub-auth MODE     how the service authenticates peers: `secret` (default;
                      SYSCONFDIR/ferry/hub/secret, from `hub secret`) or `keys`
                      (SYSCONFDIR/ferry/hub/key from `hub keygen`, and
                      SYSCONFDIR/ferry/hub/authorized, the accepted public keys)
  --no-unit           install no unit and no configuration
  --destdir DIR       stage everything under DIR (for packages): files go to
                      DIR/PREFIX/..., while the unit names PREFIX/bin/hub
  -h, --help          this text

The service itself is not enabled or started; see docs/user-guide.md,
"Running Ferry as a service".
EOF
}

die() {
    echo "$me: $*" >&2
    exit 1
}

bad_usage() {
    echo "$me: $*" >&2
    echo "run 'Tools/install.sh --help' for usage" >&2
    exit 64
}

from=""
unit_dir=""
sysconfdir=""
hub_auth=secret
with_unit=1
destdir="${DESTDIR:-}"
prefix=""
while (($#)); do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --from|--unit-dir|--sysconfdir|--hub-auth|--destdir)
            (($# >= 2)) || bad_usage "$1 needs a value"
            case "$1" in
                --from) from=$2 ;;
                --unit-dir) unit_dir=$2 ;;
                --sysconfdir) sysconfdir=$2 ;;
                --hub-auth) hub_auth=$2 ;;
                --destdir) destdir=$2 ;;
            esac
            shift 2 ;;
        --from=*) from=${1#*=}; shift ;;
        --unit-dir=*) unit_dir=${1#*=}; shift ;;
        --sysconfdir=*) sysconfdir=${1#*=}; shift ;;
        --hub-auth=*) hub_auth=${1#*=}; shift ;;
        --destdir=*) destdir=${1#*=}; shift ;;
        --no-unit) with_unit=0; shift ;;
        --) shift; (($#)) && { [[ -z $prefix ]] || bad_usage "one PREFIX only; got '$prefix' and '$1'"; prefix=$1; shift; } ;;
        -*) bad_usage "unknown option $1" ;;
        *)
            [[ -z $prefix ]] || bad_usage "one PREFIX only; got '$prefix' and '$1'"
            prefix=$1; shift ;;
    esac
done

[[ -n $prefix ]] || bad_usage "no PREFIX given: name where to install, e.g. 'Tools/install.sh /usr/local' (as root) or 'Tools/install.sh ~/.local'"
[[ $prefix == /* ]] || bad_usage "PREFIX must be an absolute path (the unit names PREFIX/bin/hub); got '$prefix', perhaps $PWD/$prefix"
prefix=${prefix%/}
[[ -n $prefix ]] || bad_usage "PREFIX / is not supported; use /usr or /usr/local"
case "$hub_auth" in
    secret|keys) ;;
    *) bad_usage "--hub-auth takes 'secret' or 'keys'; got '$hub_auth'" ;;
esac
if [[ -z $sysconfdir ]]; then
    case "$prefix" in
        /usr|/usr/local) sysconfdir=/etc ;;
        *) sysconfdir=$prefix/etc ;;
    esac
fi
[[ $sysconfdir == /* ]] || bad_usage "--sysconfdir must be an absolute path; got '$sysconfdir'"
unit_dir=${unit_dir:-$prefix/lib/systemd/system}
[[ $unit_dir == /* ]] || bad_usage "--unit-dir must be an absolute path; got '$unit_dir'"
[[ -n $destdir && $destdir != /* ]] && bad_usage "--destdir must be an absolute path; got '$destdir'"
destdir=${destdir%/}

# Can we write there? Find the deepest existing ancestor of each target
# directory and try to create a file in it, before building anything (a
# permission test alone says yes to root on a read-only file system).
writable() {
    local dir=$1 probe
    while [[ ! -e $dir ]]; do dir=$(dirname "$dir"); done
    if [[ -d $dir ]] && probe=$(mktemp -p "$dir" .ferry-install-probe.XXXXXX 2>/dev/null); then
        rm -f "$probe"
    else
        echo "$dir"
        return 1
    fi
}
targets=("$destdir$prefix")
((with_unit)) && targets+=("$destdir$unit_dir" "$destdir$sysconfdir")
for target in "${targets[@]}"; do
    if ! blocked=$(writable "$target"); then
        if [[ -d $blocked ]]; then
            if ((EUID == 0)); then
                die "cannot install into $target: $blocked is not writable, even by root (a read-only file system?); choose another PREFIX"
            fi
            die "cannot install into $target: $blocked is not writable by $(id -un) (run as root, or choose a PREFIX you own such as \$HOME/.local)"
        fi
        die "cannot install into $target: $blocked exists and is not a directory"
    fi
done

# The binaries: built here, or taken from --from.
if [[ -n $from ]]; then
    [[ -d $from ]] || die "--from $from is not a directory (pass what \`swift build --show-bin-path\` prints)"
    bin=$(cd "$from" && pwd)
else
    cd "$here/.."
    command -v swift >/dev/null || die "swift is not on PATH: install the Swift toolchain, or pass --from DIR with built binaries"
    Tools/setup.sh
    # The Swift runtime linked in, so the commands run on hosts without the
    # toolchain; in a build directory of its own, so that these flags do not
    # rebuild everything in .build/release each time.
    build=(swift build -c release --static-swift-stdlib --scratch-path .build-install)
    for product in "${tools[@]}" ferry-manual; do
        echo "$me: building $product (release, Swift runtime linked statically)" >&2
        "${build[@]}" --product "$product" >&2
    done
    bin=$("${build[@]}" --show-bin-path)
fi
for tool in "${tools[@]}" ferry-manual; do
    [[ -x $bin/$tool ]] || die "$bin/$tool is missing or not executable (build it with \`swift build --product $tool\`, or \`swift build\` for all)"
done
version=$("$bin/leecher" --version 2>/dev/null) || die "$bin/leecher --version failed: is it a Ferry build for this machine?"
runtime=$(ldd "$bin/hub" 2>/dev/null | awk '$1 == "libswiftCore.so" { print $3 }')
if [[ -n $runtime ]]; then
    echo "$me: note: these binaries load the Swift runtime from $(dirname "$runtime"); they run only where that toolchain is (without --from, install.sh links it in)" >&2
fi

root=$destdir$prefix
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

put() { # put MODE SOURCE DESTINATION
    install -D -m "$1" "$2" "$3"
    echo "  $3"
}

echo "$me: installing Ferry $version under $root" >&2
for tool in "${tools[@]}"; do
    put 0755 "$bin/$tool" "$root/bin/$tool"
done

# Man pages: from each command's description of itself.
for tool in "${tools[@]}"; do
    related=()
    for other in "${tools[@]}"; do [[ $other == "$tool" ]] || related+=(--related "$other"); done
    "$bin/$tool" --experimental-dump-help > "$work/$tool.json" \
        || die "$bin/$tool --experimental-dump-help failed"
    "$bin/ferry-manual" --output-directory "$work/man1" --source "Ferry $version" "${related[@]}" "$work/$tool.json" >/dev/null \
        || die "cannot write the man pages of $tool"
done
for page in "$work"/man1/*.1; do
    put 0644 "$page" "$root/share/man/man1/$(basename "$page")"
done

# Completions: from the parser, each as the shell's completion loader expects it.
for tool in "${tools[@]}"; do
    for shell in bash zsh fish; do
        "$bin/$tool" --generate-completion-script "$shell" > "$work/$tool.$shell" \
            || die "$bin/$tool --generate-completion-script $shell failed"
    done
    put 0644 "$work/$tool.bash" "$root/share/bash-completion/completions/$tool"
    put 0644 "$work/$tool.zsh" "$root/share/zsh/site-functions/_$tool"
    put 0644 "$work/$tool.fish" "$root/share/fish/vendor_completions.d/$tool.fish"
done

if ((with_unit)); then
    # ${CREDENTIALS_DIRECTORY} is for systemd to expand, at each start.
    # shellcheck disable=SC2016
    if [[ $hub_auth == secret ]]; then
        credentials="LoadCredential=secret:$sysconfdir/ferry/hub/secret"
        auth='--secret-file ${CREDENTIALS_DIRECTORY}/secret'
    else
        credentials="LoadCredential=key:$sysconfdir/ferry/hub/key
LoadCredential=authorized:$sysconfdir/ferry/hub/authorized"
        auth='--key ${CREDENTIALS_DIRECTORY}/key --authorized ${CREDENTIALS_DIRECTORY}/authorized'
    fi
    unit=$(<"$here/systemd/ferry-hub.service.in")
    unit=${unit//@BINDIR@/$prefix/bin}
    unit=${unit//@SYSCONFDIR@/$sysconfdir}
    unit=${unit//@CREDENTIALS@/$credentials}
    unit=${unit//@AUTH_OPTIONS@/$auth}
    printf '%s\n' "$unit" > "$work/ferry-hub.service"
    put 0644 "$work/ferry-hub.service" "$destdir$unit_dir/ferry-hub.service"

    # Configuration is the administrator's: never overwrite it.
    config=$destdir$sysconfdir/ferry
    if [[ -e $config/hub.env ]]; then
        echo "  $config/hub.env (kept)"
    else
        put 0644 "$here/systemd/hub.env" "$config/hub.env"
    fi
    install -d -m 0700 "$config/hub"
    echo "  $config/hub/ (credentials, root only)"
    if [[ $hub_auth == secret ]]; then
        [[ -e $config/hub/secret ]] || missing="(umask 077; $prefix/bin/hub secret > $sysconfdir/ferry/hub/secret)"
    else
        [[ -e $config/hub/key && -e $config/hub/authorized ]] \
            || missing="$prefix/bin/hub keygen -o $sysconfdir/ferry/hub/key, and the public keys it accepts in $sysconfdir/ferry/hub/authorized"
    fi
    if [[ -n ${missing:-} ]]; then
        echo "$me: the service needs its credentials before it starts: $missing" >&2
    fi
fi
echo "$me: done." >&2
case ":$PATH:" in
    *":$prefix/bin:"*) ;;
    *) echo "$me: $prefix/bin is not in PATH; add it (man finds the pages through PATH as well)" >&2 ;;
esac
