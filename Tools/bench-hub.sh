#!/usr/bin/env bash
# Hub benchmark: builds ferry-bench-hub and memwriter in release mode and runs
# them (as root: the seeder attaches to the workload with ptrace and uffd).
# Bytes read from the seeder with 1, 4 and 16 leechers through one hub,
# against a direct single-leecher migration in the same run, and the
# aggregate leecher throughput. About a minute with the defaults.
#
#   Tools/bench-hub.sh [--mib N] [--rate W] [--leechers 1,4,16]
#
# --mib     workload size (default 64)
# --rate    writes per second of the workload's writer thread (default 0: idle)
# --leechers the hub runs (default 1,4,16)
# Results: docs/benchmarks-hub.md.
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in -h|--help) sed -n '2,14p' "$0"; exit 0 ;; esac
SCRATCH=${FERRY_BENCH_SCRATCH:-.build}
for product in memwriter seeder leecher hub ferry-bench-hub; do
    swift build -c release --scratch-path "$SCRATCH" --product "$product" >/dev/null
done
exec "$SCRATCH/release/ferry-bench-hub" "$@"
