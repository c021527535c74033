#!/usr/bin/env bash
# Wire benchmark: builds ferry-bench-wire (release) and the C reference, then
# measures in one run, over loopback TCP:
#   - plain TCP: the C reference without encryption, and blocking sockets in Swift;
#   - Ferry's transport without encryption;
#   - the C reference with AES-256-GCM (seal, send, receive, open; 2 threads);
#   - Ferry's SecureChannel over its libuv TCP transport, 1 sealing core and --cores;
#   - RPC round trips through SecureChannel, 1 and 256 in flight.
# Prints GB/s for each and Ferry's share of the C reference.
#
# Ferry seals and opens large records on low-priority threads (BulkWorkers,
# nice +10 by default) so that small messages are not delayed behind them.
# The C reference runs at normal priority, so the secure cases compared with
# it run with FERRY_BULK_NICE=0 (the same priority); one more case shows the
# default, which gives way to any other work on the host.
#
#   Tools/bench-wire.sh [--bytes N] [--cores N] [--runs N] [--cipher aes|xchacha]
#
# --runs rounds (default 3) each run every case back to back; ratios are
# taken within a round and the median is reported, so a load spike from other
# work on the host skews one round, not the comparison. Best on an idle host.
set -euo pipefail
cd "$(dirname "$0")/.."

BYTES=$((1 << 30)); CORES=$(nproc); RUNS=3; CIPHER=aes
while [ $# -gt 0 ]; do
    case "$1" in
        --bytes) BYTES=$2; shift 2 ;;
        --cores) CORES=$2; shift 2 ;;
        --runs) RUNS=$2; shift 2 ;;
        --cipher) CIPHER=$2; shift 2 ;;
        -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
        *) echo "bench-wire.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

SCRATCH=${SCRATCH:-.build-bench}
mkdir -p Tools/bin
echo "# building (release)..." >&2
swift build -c release --scratch-path "$SCRATCH" --product ferry-bench-wire >&2
cc -O2 -Wall -o Tools/bin/cref Tools/cref/cref.c -lsodium -lpthread
BENCH="$SCRATCH/release/ferry-bench-wire"
CREF=Tools/bin/cref

value() { echo "$1" | sed -E 's/.* ([0-9.]+) GB\/s.*/\1/'; }
run() { "$@" | grep 'GB/s' | tail -1; }
median() { sort -g | awk '{a[NR]=$1} END{ if (NR%2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2 }'; }
pct() { awk "BEGIN{printf \"%.0f\", 100 * $1 / $2}"; }

echo "# host: $(nproc) cores, $(uname -r), load $(cut -d' ' -f1-3 /proc/loadavg)"
echo "# $((BYTES >> 20)) MiB of 1 MiB frames per run, $RUNS rounds, cipher $CIPHER"
echo "# Each round runs every case back to back; a ratio is taken within a"
echo "# round (same machine load), and the median over rounds is reported."

declare -A R
for round in $(seq "$RUNS"); do
    echo "## round $round (load $(cut -d' ' -f1 /proc/loadavg))"
    l=$(run "$CREF" --bytes "$BYTES" --cipher none);                          echo "$l"; R[plainc,$round]=$(value "$l")
    l=$(run "$BENCH" --bytes "$BYTES" --only socket);                          echo "$l"; R[plains,$round]=$(value "$l")
    l=$(run "$BENCH" --bytes "$BYTES" --only transport);                       echo "$l"; R[fplain,$round]=$(value "$l")
    l=$(run "$CREF" --bytes "$BYTES" --cipher "$CIPHER");                      echo "$l"; R[cref,$round]=$(value "$l")
    l=$(FERRY_BULK_NICE=0 run "$BENCH" --bytes "$BYTES" --only secure --cores 1 --cipher "$CIPHER"); echo "$l"; R[sec1,$round]=$(value "$l")
    if [ "$CORES" -gt 1 ]; then
        l=$(FERRY_BULK_NICE=0 run "$BENCH" --bytes "$BYTES" --only secure --cores "$CORES" --cipher "$CIPHER"); echo "$l"; R[secn,$round]=$(value "$l")
    fi
    l=$(FERRY_BULK_NICE=0 run "$BENCH" --bytes "$BYTES" --only secure --cores 1 --cipher "$CIPHER" --default-malloc); echo "$l (glibc malloc defaults)"; R[secd,$round]=$(value "$l")
    l=$(run "$BENCH" --bytes "$BYTES" --only secure --cores 1 --cipher "$CIPHER"); echo "$l (bulk workers at their default nice +10)"; R[secp,$round]=$(value "$l")
done

ratio() { # ratio <num key> <den key>: median over rounds of num/den, in %
    for round in $(seq "$RUNS"); do pct "${R[$1,$round]}" "${R[$2,$round]}"; echo; done | median
}
best() { for round in $(seq "$RUNS"); do echo "${R[$1,$round]}"; done | sort -g | tail -1; }

echo "# best GB/s over rounds"
echo "plain TCP, C (cref --cipher none):     $(best plainc)"
echo "plain TCP, Swift blocking sockets:     $(best plains)"
echo "ferry transport, no encryption:        $(best fplain)"
echo "C reference, $CIPHER:                  $(best cref)"
echo "ferry secure channel, 1 core:          $(best sec1)"
[ "$CORES" -gt 1 ] && echo "ferry secure channel, $CORES cores:          $(best secn)"
echo "ferry secure, 1 core, default malloc:  $(best secd)"
echo "ferry secure, 1 core, bulk nice +10:   $(best secp)"
echo "# median ratios within a round"
echo "ferry transport / plain TCP C:         $(ratio fplain plainc) %"
echo "ferry secure 1 core / C reference:     $(ratio sec1 cref) %   (target >= 85 %)"
[ "$CORES" -gt 1 ] && echo "ferry secure $CORES cores / C reference:     $(ratio secn cref) %"
echo "ferry secure, default malloc / C ref:  $(ratio secd cref) %"
echo "ferry secure, bulk nice +10 / C ref:   $(ratio secp cref) %   (the product default; yields to other work)"
echo "# round trips"
"$BENCH" --only pingpong | grep -v '^#'
"$BENCH" --only rpc --cipher "$CIPHER" | grep -v '^#'
