#!/usr/bin/env bash
# Bandwidth cap benchmark (issue 14): builds the products it runs in release
# mode and runs ferry-bench-bwcap as root (the seeder attaches to the
# workload with ptrace and userfaultfd). Real seeder and leecher processes
# migrate a memwriter workload under caps of 50 and 200 MB/s, held by the
# seeder and by the leecher; the achieved rate must be within ±5 % of the
# cap. Post-copy first touches under the cap are timed against an uncapped
# ReadAt round trip of the same run (target <= 3x, median and p99).
# About 3 minutes with the defaults (3 runs).
#
#   Tools/bench-bwcap.sh [--caps 50M,200M] [--runs N] [--seconds S]
#                        [--sides seeder,leecher] [--touches N] [--no-rate] [--no-touch]
#
# Results and method: docs/benchmarks-bandwidth.md.
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in -h|--help) sed -n '2,14p' "$0"; exit 0 ;; esac
SCRATCH=${FERRY_BENCH_SCRATCH:-.build}
for product in memwriter seeder leecher ferry-bench-bwcap; do
    swift build -c release --scratch-path "$SCRATCH" --product "$product" >/dev/null
done
exec "$SCRATCH/release/ferry-bench-bwcap" "$@"
