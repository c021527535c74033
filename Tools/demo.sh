#!/usr/bin/env bash
# Sets up, builds, and migrates a live multi-threaded workload on this machine
# end to end: memwriter writes from 4 threads with mapping churn while the
# leecher pulls it; the seeder freezes it at 95 %, post-copy fills the rest,
# and the image is checked byte for byte against the stopped source.
# Run as root (ptrace and userfaultfd on another process).
set -euo pipefail
cd "$(dirname "$0")/.."
Tools/setup.sh
echo "demo: building (release)..." >&2
swift build -c release --product seeder >/dev/null
swift build -c release --product leecher >/dev/null
swift build -c release --product memwriter >/dev/null
bin=$(swift build -c release --show-bin-path)

work=$(mktemp -d /tmp/ferry-demo.XXXXXX)
secret="$work/secret"
"$bin/seeder" secret > "$secret"
chmod 600 "$secret"
port=$((17000 + RANDOM % 2000))

cleanup() {
    [[ -n "${seeder_pid:-}" ]] && kill "$seeder_pid" 2>/dev/null || true
    [[ -n "${workload_pid:-}" ]] && kill -9 "$workload_pid" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

# The workload: 256 MiB, 4 writer threads at 20,000 writes/s each, mmap churn.
coproc WORKLOAD { exec "$bin/memwriter" --mib 256 --threads 4 --rate 20000 --churn --heap-grow --shared 16 --pattern; }
while read -r word rest <&"${WORKLOAD[0]}"; do
    if [[ "$word" == pid ]]; then workload_pid=${rest%% *}; break; fi
done
echo "demo: workload running as pid $workload_pid"

"$bin/seeder" serve "$workload_pid" --listen "127.0.0.1:$port" --secret-file "$secret" --then stop &
seeder_pid=$!
sleep 0.5

"$bin/leecher" pull "127.0.0.1:$port" --secret-file "$secret" --finalize-at 95% --out "$work/image"
wait "$seeder_pid"
seeder_pid=

echo "demo: checking the image against the stopped source, byte for byte..."
"$bin/leecher" verify "$work/image" --pid "$workload_pid"
du -sh --apparent-size "$work/image" | sed 's/^/demo: image size /'
