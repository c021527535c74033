// swift-tools-version:6.0
import PackageDescription

let package = Package(
    name: "Ferry",
    platforms: [.macOS(.v15)],
    products: [
        .executable(name: "seeder", targets: ["seeder"]),
        .executable(name: "leecher", targets: ["leecher"]),
        .executable(name: "hub", targets: ["hub"]),
        .library(name: "FerryMigration", targets: ["FerryMigration"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0"),
    ],
    targets: [
        // The only C shim: syscall wrappers and the kernel structs Debian's headers lack.
        .target(name: "CFerryLinux"),
        .systemLibrary(
            name: "CSodium",
            pkgConfig: "libsodium",
            providers: [.apt(["libsodium-dev"])]
        ),
        .systemLibrary(
            name: "CUV",
            pkgConfig: "libuv",
            providers: [.apt(["libuv1-dev"])]
        ),
        // Record compression for slow links (issue 14).
        .systemLibrary(
            name: "CZstd",
            pkgConfig: "libzstd",
            providers: [.apt(["libzstd-dev"])]
        ),
        // Kernel facilities: maps, freezer, remote syscall, userfaultfd, trackers, page reader.
        .target(name: "FerryToolkit"),
        .target(name: "FerrySystem", dependencies: ["CFerryLinux", "FerryToolkit"]),
        // Transports, secure channel, RPC.
        .target(name: "FerryWire", dependencies: ["CUV", "CSodium", "CZstd", "FerryToolkit"]),
        // Seeder, leecher, hub, heuristics, page store, image format.
        // CRIU's commands, page-server protocol and images (issue 13, Protocols/criu.md).
        .target(name: "FerryCRIU", dependencies: ["FerryToolkit", "CFerryLinux"]),
        .target(name: "FerryMigration", dependencies: ["FerrySystem", "FerryWire", "FerryToolkit", "FerryCRIU"]),
        // What the three commands share: credential flags, JSON events, progress, exit codes.
        .target(
            name: "FerryCLI",
            dependencies: ["FerryMigration", .product(name: "ArgumentParser", package: "swift-argument-parser")]
        ),
        .executableTarget(name: "seeder", dependencies: ["FerryCLI"]),
        .executableTarget(name: "leecher", dependencies: ["FerryCLI"]),
        .executableTarget(name: "hub", dependencies: ["FerryCLI"]),
        // Workload generator used by tests and benchmarks (C, no runtime to disturb timings).
        .executableTarget(name: "memwriter", path: "Tools/memwriter"),
        // A process whose memory is in huge pages (MAP_HUGETLB, SHM_HUGETLB, MFD_HUGETLB), written while it runs.
        .executableTarget(name: "hugemem", path: "Tools/hugemem"),
        // A TCP relay that drops its connections on command (reconnect tests).
        .executableTarget(name: "relay", path: "Tools/relay"),
        // Wire benchmark: transports, secure channel and RPC against baselines (Tools/bench-wire.sh).
        .executableTarget(name: "ferry-bench-wire", dependencies: ["FerryWire"], path: "Tools/bench-wire"),
        // System benchmark: tracker cost, scan time, read throughput, with same-run baselines.
        .executableTarget(name: "ferry-bench-system", dependencies: ["FerrySystem", "FerryToolkit", "CFerryLinux", "FerryTestSupport"],
                          path: "Tools/bench-system"),
        // Post-copy benchmark: first-touch latency and background fill against same-run baselines.
        .executableTarget(name: "ferry-bench-postcopy", dependencies: ["FerryMigration", "FerryWire", "FerryTestSupport"],
                          path: "Tools/bench-postcopy"),
        // Bandwidth cap benchmark: achieved rate against the cap, post-copy touches under it (Tools/bench-bwcap.sh).
        .executableTarget(name: "ferry-bench-bwcap", dependencies: ["FerryMigration", "FerryWire", "FerryTestSupport"],
                          path: "Tools/bench-bwcap"),
        // Post-copy demonstration: a key-value server and the destination that queries it right after Finalize.
        .executableTarget(name: "kvstore", path: "Tools/kvstore"),
        .executableTarget(name: "kvstore-migrate", dependencies: ["FerryMigration", "FerryWire"], path: "Tools/kvstore-migrate"),
        // Hub benchmark: bytes read from the seeder with 1, 4, 16 leechers vs direct (Tools/bench-hub.sh).
        .executableTarget(name: "ferry-bench-hub", dependencies: ["FerryMigration", "FerryTestSupport"],
                          path: "Tools/bench-hub"),
        // Bookkeeping benchmark: marking scattered pages and coding dirty reports against a plain array.
        .executableTarget(name: "ferry-bench-bookkeeping", dependencies: ["FerryMigration"], path: "Tools/bench-bookkeeping"),
        // Migration benchmark: seeder and leecher processes under load, against stop-and-copy and the link (issue 10).
        .executableTarget(name: "ferry-bench-migrate", dependencies: ["FerryTestSupport"], path: "Tools/bench-migrate"),
        // Compression benchmark: a CPython heap through a 100 MB/s relay, zstd vs off, and auto vs off on loopback (issue 14).
        .executableTarget(name: "ferry-bench-compress", dependencies: ["FerryTestSupport"], path: "Tools/bench-compress"),
        // A process whose main thread has exited while two threads write (issue 15, class 4).
        .executableTarget(name: "deadleader", path: "Tools/deadleader"),
        // Man pages from a command's --experimental-dump-help JSON (Tools/install.sh).
        .executableTarget(name: "ferry-manual", path: "Tools/manual"),
        // Real child processes for tests: the workload generator and the relay.
        .target(name: "FerryTestSupport", dependencies: ["FerrySystem"], path: "Tests/FerryTestSupport"),
        .testTarget(name: "FerryToolkitTests", dependencies: ["FerryToolkit"]),
        .testTarget(name: "FerrySystemTests", dependencies: ["FerrySystem", "FerryTestSupport"]),
        .testTarget(name: "FerryWireTests", dependencies: ["FerryWire", "FerryTestSupport"]),
        .testTarget(name: "FerryMigrationTests", dependencies: ["FerryMigration", "FerryTestSupport", "FerryCLI"]),
    ],
    swiftLanguageModes: [.v6]
)
