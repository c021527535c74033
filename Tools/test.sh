#!/usr/bin/env bash
# Sets up and runs Ferry's test suite: real processes, real sockets, as root.
set -euo pipefail
cd "$(dirname "$0")/.."
Tools/setup.sh
swift build --build-tests
swift test --skip-build
