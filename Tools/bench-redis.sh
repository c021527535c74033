#!/usr/bin/env bash
# Redis write throughput untracked vs tracked by `seeder track --interval 100`
# (every page write-protected and rescanned every 100 ms), in alternating
# rounds of the same run so that machine noise hits every side alike.
# Two ways of tracking, each against the same untracked rounds:
#   read  written pages are protected again only when read, as `seeder serve`
#         does while migrating (`--rearm read`): the seeder's way
#   scan  every scan protects the pages it reports again (`--rearm scan`, the
#         default of `seeder track`, for exact per-second counts): each page
#         redis dirties again costs it one write fault per scan
#
# usage: Tools/bench-redis.sh [path/to/seeder]     (run as root; release build recommended)
# env:   ROUNDS=3 REQUESTS=1000000 KEYS=200000 SIZE=256 PIPELINE=16 CLIENTS=50
#        TRACKER=async|sync (default: the seeder's choice) PORT=6399 TESTS=set,incr,lpush
#        SEEDER_CPU=1 (core for the seeder; "any" = unpinned) INTERVAL=100 (ms between scans)
#        REARM="read scan" (the tracking modes to measure)
# Prints one line per round and test, then the medians and their ratio
# (target: tracked >= 90 % of untracked).
set -euo pipefail
cd "$(dirname "$0")/.."

SEEDER=${1:-.build/release/seeder}
ROUNDS=${ROUNDS:-3}
REQUESTS=${REQUESTS:-1000000}
KEYS=${KEYS:-200000}
SIZE=${SIZE:-256}
PIPELINE=${PIPELINE:-16}
CLIENTS=${CLIENTS:-50}
PORT=${PORT:-6399}
TESTS=${TESTS:-set,incr,lpush}
REARM=${REARM:-read scan}
TRACKER_ARGS=()
[ -n "${TRACKER:-}" ] && TRACKER_ARGS=(--tracker "$TRACKER")

for tool in redis-server redis-benchmark redis-cli; do
    command -v "$tool" >/dev/null || { echo "bench-redis: $tool is missing (apt-get install redis-server redis-tools)" >&2; exit 1; }
done
[ -x "$SEEDER" ] || { echo "bench-redis: $SEEDER is missing (swift build -c release --product seeder)" >&2; exit 1; }

WORK=$(mktemp -d)
REDIS_PID=
SEEDER_PID=
cleanup() {
    [ -n "$SEEDER_PID" ] && kill -INT "$SEEDER_PID" 2>/dev/null && wait "$SEEDER_PID" 2>/dev/null || true
    [ -n "$REDIS_PID" ] && kill "$REDIS_PID" 2>/dev/null && wait "$REDIS_PID" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

# Two cores: redis on one, the benchmark client on the other. The seeder
# shares the client's core (SEEDER_CPU=any leaves it unpinned), so its scans
# measure the tracking cost inside redis, not a fight for redis's core.
PIN_SERVER=(); PIN_CLIENT=(); PIN_SEEDER=()
if command -v taskset >/dev/null && [ "$(nproc)" -ge 2 ]; then
    PIN_SERVER=(taskset -c 0); PIN_CLIENT=(taskset -c 1)
    [ "${SEEDER_CPU:-1}" != any ] && PIN_SEEDER=(taskset -c "${SEEDER_CPU:-1}")
fi

"${PIN_SERVER[@]}" redis-server --port "$PORT" --save '' --appendonly no --daemonize no \
    --dir "$WORK" --logfile "$WORK/redis.log" &
REDIS_PID=$!
for _ in $(seq 100); do redis-cli -p "$PORT" ping >/dev/null 2>&1 && break; sleep 0.05; done
redis-cli -p "$PORT" ping >/dev/null

bench() { # prints "TEST rps" lines
    "${PIN_CLIENT[@]}" redis-benchmark -p "$PORT" -t "$TESTS" -n "$REQUESTS" -r "$KEYS" -d "$SIZE" \
        -P "$PIPELINE" -c "$CLIENTS" --csv 2>/dev/null | awk -F'"' 'NR > 1 { print $2, $4 }'
}

echo "redis-server pid $REDIS_PID; $REQUESTS requests per test ($TESTS), $KEYS keys, ${SIZE}-byte values, pipeline $PIPELINE, $CLIENTS clients"
bench >/dev/null # warm-up: creates the keys, so later rounds overwrite instead of allocating
echo "warm-up done: redis uses $(redis-cli -p "$PORT" info memory | awk -F: '/^used_memory_human/ { print $2 }' | tr -d '\r')"

: >"$WORK/untracked"
for mode in $REARM; do : >"$WORK/tracked-$mode"; done
for round in $(seq "$ROUNDS"); do
    bench | sed "s/^/$round /" | tee -a "$WORK/untracked" | sed 's/^/untracked     round /'
    for mode in $REARM; do
        "${PIN_SEEDER[@]}" "$SEEDER" track "$REDIS_PID" "${TRACKER_ARGS[@]}" --seconds 0 --interval "${INTERVAL:-100}" \
            --rearm "$mode" --json >"$WORK/seeder.$round.$mode" 2>"$WORK/seeder.err" &
        SEEDER_PID=$!
        for _ in $(seq 200); do grep -q '"event":"tracking"' "$WORK/seeder.$round.$mode" 2>/dev/null && break; sleep 0.05; done
        grep -q '"event":"tracking"' "$WORK/seeder.$round.$mode" || { echo "bench-redis: seeder did not start tracking:" >&2; cat "$WORK/seeder.err" >&2; exit 1; }
        bench | sed "s/^/$round /" | tee -a "$WORK/tracked-$mode" | sed "s/^/rearm $mode round /"
        kill -INT "$SEEDER_PID"
        if ! wait "$SEEDER_PID"; then echo "bench-redis: seeder failed:" >&2; cat "$WORK/seeder.err" >&2; SEEDER_PID=; exit 1; fi
        SEEDER_PID=
        scans=$(grep -c '"event":"interval"' "$WORK/seeder.$round.$mode" || true)
        pages=$(awk -F'"dirtyPages":' '/"event":"detached"/ { split($2, a, ","); print a[1] }' "$WORK/seeder.$round.$mode")
        echo "rearm $mode round $round: seeder reported $pages dirty pages over $scans one-second intervals"
    done
done

median() { sort -n | awk '{ v[NR] = $1 } END { if (NR) print v[int((NR + 1) / 2)]; else print 0 }'; }
echo "medians over $ROUNDS rounds (requests per second):"
for mode in $REARM; do
    for test in $(awk '{ print $2 }' "$WORK/untracked" | sort -u); do
        u=$(awk -v t="$test" '$2 == t { print $3 }' "$WORK/untracked" | median)
        t=$(awk -v t="$test" '$2 == t { print $3 }' "$WORK/tracked-$mode" | median)
        ratio=$(awk -v u="$u" -v t="$t" 'BEGIN { printf "%.1f", (u > 0 ? 100 * t / u : 0) }')
        # Ratio within each round (tracked right after untracked), then their median:
        # steadier when the machine's load changes between rounds.
        paired=$(join <(awk -v t="$test" '$2 == t { print $1, $3 }' "$WORK/untracked" | sort) \
                      <(awk -v t="$test" '$2 == t { print $1, $3 }' "$WORK/tracked-$mode" | sort) |
                 awk '$2 > 0 { printf "%.1f\n", 100 * $3 / $2 }' | median)
        echo "  rearm $mode, $test: untracked $u, tracked $t, ratio of medians $ratio %, median of per-round ratios $paired % (target >= 90 %)"
    done
done
