#!/bin/sh
# Post-copy demonstration on this machine: start kvstore (a key-value server
# whose state is one table), serve it with `seeder serve`, and migrate it with
# kvstore-migrate, which answers lookups from the migrated table right after
# Finalize while the rest streams in. See docs/postcopy.md.
#
#   Tools/postcopy-demo.sh [--finalize-at PCT]   (run as root, after swift build)
set -eu
cd "$(dirname "$0")/.."
BIN=${BIN:-$(swift build --show-bin-path 2>/dev/null || echo .build/debug)}
FINALIZE=${2:-50%}
WORK=$(mktemp -d /tmp/ferry-postcopy-demo.XXXXXX)
trap 'kill $KV $SEEDER 2>/dev/null || true; rm -rf "$WORK"' EXIT
"$BIN/seeder" secret > "$WORK/secret" 2>/dev/null || head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$WORK/secret"
chmod 600 "$WORK/secret"

mkfifo "$WORK/kv-in"
"$BIN/kvstore" --keys 200000 --bits 20 --rate 20000 < "$WORK/kv-in" > "$WORK/kv-out" &
KV=$!
exec 3> "$WORK/kv-in"    # keeps kvstore's stdin open
sleep 0.5
read -r _ _ PID _ TABLE _ BITS _ KEYS < "$WORK/kv-out"
echo "kvstore pid $PID: table at $TABLE (2^$BITS slots, $KEYS keys), updating 20000 values/s"

PORT=$((20000 + $$ % 20000))
"$BIN/seeder" serve "$PID" --listen "127.0.0.1:$PORT" --secret-file "$WORK/secret" --json > "$WORK/seeder.json" &
SEEDER=$!
sleep 0.5
"$BIN/kvstore-migrate" "127.0.0.1:$PORT" --table "$TABLE" --bits "$BITS" --keys "$KEYS" \
    --secret-file "$WORK/secret" --finalize-at "$FINALIZE" --queries 10
wait $SEEDER && echo "seeder: migration complete; kvstore pid $PID is left stopped (kill -CONT $PID to resume it)"
