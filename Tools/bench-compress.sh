#!/usr/bin/env bash
# Compression benchmark (issue 14): builds the products it runs in release
# mode and runs ferry-bench-compress as root. A CPython process holding a
# dict of ~256 MiB of strings is migrated (`seeder serve` + `leecher pull
# --out`) through Tools/relay capped at 100 MB/s with --compress zstd, off
# and auto, and straight over loopback with auto and off; 3 rounds, medians,
# total time, bytes on the wire, compression ratio, and MET / MISSED for
# "auto no more than 5 % slower than off over loopback". About 3 minutes.
#
#   Tools/bench-compress.sh [--runs N] [--mib N] [--rate BYTES_PER_SEC] [--cases LIST] [--scratch DIR]
#
# Results and method: docs/benchmarks-compression.md.
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in -h|--help) sed -n '2,12p' "$0"; exit 0 ;; esac
command -v python3 >/dev/null || { echo "bench-compress: python3 is missing (apt-get install python3)" >&2; exit 1; }
SCRATCH=${FERRY_BENCH_SCRATCH:-.build}
for product in relay seeder leecher ferry-bench-compress; do
    swift build -c release --scratch-path "$SCRATCH" --product "$product" >/dev/null
done
exec "$SCRATCH/release/ferry-bench-compress" "$@"
