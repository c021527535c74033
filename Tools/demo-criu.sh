#!/usr/bin/env bash
# The whole process moves (issue 13): a program that counts once a second
# (Tools/criu-workload: 256 MiB under random writes, four threads, an open
# log file, a listening socket) runs on a "source host", a network namespace,
# as init of its own pid namespace; Ferry pre-copies its memory, CRIU dumps
# the rest at the freeze, and it is restored on a "destination host", another
# network namespace, where it keeps counting in the same log while Ferry
# serves CRIU the memory. Then it checks its own memory (its ledger) and the
# source is gone. Run as root.
set -euo pipefail
cd "$(dirname "$0")/.."
Tools/setup.sh
export FERRY_CRIU=$(Tools/setup-criu.sh)
echo "demo: criu is $FERRY_CRIU ($("$FERRY_CRIU" --version | head -1))" >&2
echo "demo: building (release)..." >&2
swift build -c release --product seeder >/dev/null
swift build -c release --product leecher >/dev/null
bin=$(swift build -c release --show-bin-path)

work=$(mktemp -d /tmp/ferry-demo-criu.XXXXXX)
tag=$((RANDOM % 10000))
src=ferry-demo-src-$tag dst=ferry-demo-dst-$tag link=fdemo$tag
gcc -O2 -pthread -o "$work/counter" Tools/criu-workload/workload.c
"$bin/seeder" secret > "$work/secret"
chmod 600 "$work/secret"

cleanup() {
    [[ -n "${seeder_pid:-}" ]] && kill "$seeder_pid" 2>/dev/null || true
    [[ -n "${source_pid:-}" ]] && kill -9 "$source_pid" 2>/dev/null || true
    [[ -n "${restored_pid:-}" ]] && kill -9 "$restored_pid" 2>/dev/null || true
    [[ -n "${tail_pid:-}" ]] && kill "$tail_pid" 2>/dev/null || true
    ip netns del "$src" 2>/dev/null || true
    ip netns del "$dst" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

# Two hosts: 10.233.0.1 (source) and 10.233.0.2 (destination), one veth between them.
ip netns add "$src"
ip netns add "$dst"
ip link add "$link" type veth peer name "${link}p"
ip link set "$link" netns "$src"
ip link set "${link}p" netns "$dst"
ip -n "$src" addr add 10.233.0.1/24 dev "$link"
ip -n "$dst" addr add 10.233.0.2/24 dev "${link}p"
for ns in "$src" "$dst"; do ip -n "$ns" link set lo up; done
ip -n "$src" link set "$link" up
ip -n "$dst" link set "${link}p" up

log="$work/counter.log"
nsenter --net=/run/netns/"$src" unshare --pid --fork "$work/counter" 256 20000 "$log" </dev/null >/dev/null 2>&1 &
until grep -q ready "$log" 2>/dev/null; do sleep 0.1; done
source_pid=$(pgrep -f "^$work/counter" | head -1)
echo "demo: the counter runs on the source as pid $source_pid (pid 1 in its namespace); its log:" >&2
tail -n +1 -f "$log" | sed 's/^/    counter: /' >&2 &
tail_pid=$!
sleep 3

nsenter --net=/run/netns/"$src" "$bin/seeder" serve "$source_pid" --with-criu --listen 10.233.0.1:7070 \
    --secret-file "$work/secret" --criu-dir "$work/dump" 2>&1 | sed 's/^/    /' >&2 &
seeder_pid=$!
sleep 1
nsenter --net=/run/netns/"$dst" "$bin/leecher" pull 10.233.0.1:7070 --restore --images "$work/restore" \
    --secret-file "$work/secret" 2>&1 | sed 's/^/    /' >&2
restored_pid=$(cat "$work/restore/restored.pid")
sleep 3
kill -USR1 "$restored_pid"
sleep 1
kill "$tail_pid" 2>/dev/null || true
echo >&2
if kill -0 "$source_pid" 2>/dev/null; then echo "demo: the source still runs?" >&2; exit 1; fi
echo "demo: the source (pid $source_pid) is gone; the counter runs on the destination as pid $restored_pid:" >&2
grep NSpid /proc/"$restored_pid"/status >&2
echo "demo: its network namespace is the destination's: $(readlink /proc/"$restored_pid"/ns/net) = $(ip netns exec "$dst" readlink /proc/self/ns/net)" >&2
echo "demo: it checked its own memory: $(grep 'check ' "$log" | tail -1)" >&2
grep -q "check ok" "$log"
