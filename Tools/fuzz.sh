#!/usr/bin/env bash
# Builds a libFuzzer target over the wire protocol's parsers (RPC frames, every
# handshake message in both authentication modes, Reject, records, credential
# text, via WireFuzz.run) and runs it for a bounded time.
#
#   Tools/fuzz.sh [seconds]        default 60; crashes land in .build-fuzz/
#
# Needs the Swift toolchain's fuzzer runtime (swiftc -sanitize=fuzzer) and
# libsodium-dev and libzstd-dev. Seeds come from Protocols/wire-vectors. Leak detection is off:
# the Swift runtime's metadata caches look like leaks to LeakSanitizer.
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_TO_RUN="${1:-60}"
OUT=.build-fuzz
mkdir -p "$OUT/corpus"
W=Sources/FerryWire
SOURCES=(
  Tests/FerryWireTests/WireFuzz.swift "$W/WireCodec.swift" "$W/WireLimits.swift" "$W/FrameTransport.swift"
  "$W/InMemoryTransport.swift" "$W/Sodium.swift" "$W/Keys.swift" "$W/Handshake.swift"
  "$W/SecureChannel.swift" "$W/SecureChannel+Handshake.swift" "$W/RPCMessage.swift" "$W/FrameDecoder.swift"
  "$W/Compression.swift" "$W/BulkWorkers.swift"
  Tools/fuzz/FuzzTarget.swift
)
# FerryToolkit first, as a module of its own: the wire sources import it.
swiftc -sanitize=fuzzer,address -parse-as-library -O -g -module-name FerryToolkit -emit-module \
  -emit-module-path "$OUT/FerryToolkit.swiftmodule" -emit-library -static -o "$OUT/libFerryToolkit.a" \
  Sources/FerryToolkit/*.swift
swiftc -sanitize=fuzzer,address -parse-as-library -O -g -module-name FerryWireFuzz \
  -I Sources/CSodium -I Sources/CZstd -I "$OUT" -L "$OUT" -lFerryToolkit -lsodium -lzstd "${SOURCES[@]}" -o "$OUT/fuzz-wire"

# Seed corpus: each vector frame, prefixed with the selector of its target.
seed() { printf '%s' "$2" | xxd -r -p > "$OUT/corpus/seed-$1-$3"; printf "\\x$(printf %02x "$1")" | cat - "$OUT/corpus/seed-$1-$3" > "$OUT/corpus/s$1-$3" && rm "$OUT/corpus/seed-$1-$3"; }
val() { sed -n "s/^$2 = //p" "Protocols/wire-vectors/$1"; }
seed 0 "$(val rpc-messages.txt batch_of_two_requests)" rpc
seed 1 "$(val handshake-psk.txt client_hello)" ch
seed 2 "$(val handshake-psk.txt server_hello)" sh
seed 3 "$(val handshake-psk.txt client_auth)" ca
seed 4 "$(val handshake-keys.txt server_hello)" shk
seed 5 "$(val handshake-keys.txt client_auth)" cak
seed 6 "$(val handshake-psk.txt server_accept)" acc
seed 8 "$(val handshake-psk.txt record_c2s_0_xchacha)" rec

export ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=0}"
exec "$OUT/fuzz-wire" -max_total_time="$SECONDS_TO_RUN" -max_len=4096 -timeout=5 -rss_limit_mb=1024 -detect_leaks=0 \
  -artifact_prefix="$OUT/" "$OUT/corpus"
