#!/usr/bin/env bash
# Migration benchmark (issue 10): builds the products it runs in release mode
# and runs ferry-bench-migrate as root (the seeder attaches to the workload
# with ptrace and userfaultfd). Whole migrations of memwriter at 0 / 10k /
# 100k writes/s, its churn mode, and a 20 ms RTT relay, against same-run
# stop-and-copy and encrypted-link baselines; prints MET / MISSED per target.
# About 5 minutes with the defaults (3 rounds, 1 GiB); --quick takes ~20 s.
#
#   Tools/bench-migrate.sh [--runs N] [--quick] [--cases LIST] [--mib N]
#                          [--churn-mib N] [--rtt-ms N] [--scratch DIR] [--keep-going]
#
# Results and method: docs/benchmarks-migration.md.
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in -h|--help) sed -n '2,12p' "$0"; exec .build/release/ferry-bench-migrate --help 2>/dev/null || exit 0 ;; esac
SCRATCH=${FERRY_BENCH_SCRATCH:-.build}
for product in memwriter relay seeder leecher ferry-bench-wire ferry-bench-migrate; do
    swift build -c release --scratch-path "$SCRATCH" --product "$product" >/dev/null
done
exec "$SCRATCH/release/ferry-bench-migrate" "$@"
