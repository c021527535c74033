#!/usr/bin/env bash
# Sets up and runs Ferry's test suite: real processes, real sockets, as root.
set -euo pipefail
cd "$(dirname "$0")/.."
# Real programs the end-to-end tests migrate under load.
Tools/setup.sh redis-server redis-tools python3 nodejs
# Python's Prometheus client parses what --metrics serves (MetricsTests, MetricsCommandLineTests).
Tools/setup.sh python3-prometheus-client
# A Java VM too; it is large, so a failed install only skips that one test.
Tools/setup.sh openjdk-17-jdk-headless || echo "test: openjdk-17-jdk-headless is not installed; the Java test is skipped" >&2
# InstallTests render the man pages Tools/install.sh writes and verify its systemd unit.
Tools/setup.sh man-db groff-base
Tools/setup.sh systemd || echo "test: systemd is not installed; InstallTests skips systemd-analyze verify" >&2
# Redis is started by the tests on their own ports; the packaged service is not needed.
if command -v systemctl >/dev/null && systemctl is-active --quiet redis-server 2>/dev/null; then
    systemctl stop redis-server || true
fi
# CRIU >= 4.1 for whole-process migration (issue 13): the system's, or Debian
# 13's in a private prefix; the Criu* suites find it through FERRY_CRIU.
if criu=$(Tools/setup-criu.sh); then
    export FERRY_CRIU="$criu"
else
    echo "test: CRIU could not be set up; the Criu* tests are skipped" >&2
fi
swift build --build-tests
# The suites that drive `seeder`, `leecher` and `hub` processes wait on them
# with blocking reads for minutes in all. Run beside everything else they
# would hold the cooperative pool's threads (one per core) and starve the
# in-process tests' handshakes, so they run on their own, one at a time.
commands='CommandLineTests|HubCommandLineTests|HubNetnsTests|FaultMatrixTests|GuardianTests|MetricsCommandLineTests|CriuMigrationTests|CriuFailureTests|CriuRedisTests'
swift test --skip-build --skip "$commands"
swift test --skip-build --no-parallel --filter "$commands"
