// `--metrics` on real `seeder serve` and `hub serve` processes, scraped
// during real migrations under memwriter load and parsed by Python's
// prometheus_client (MetricsScraper.swift): the families are there with the
// right types, and the figures move as the migration does.
import Foundation
import Testing
import FerryTestSupport
@testable import FerryMigration

@Suite(.serialized) struct MetricsCommandLineTests {
    static func metricsURL(in line: String) throws -> String {
        guard let range = line.range(of: #"http://127\.0\.0\.1:\d+/metrics"#, options: .regularExpression) else {
            throw TestFailure("no metrics URL in \(line)")
        }
        return String(line[range])
    }

    /// The families both commands expose, with their types as the parser
    /// names them (a counter's family drops `_total`).
    static let common: [String: String] = [
        "ferry_info": "gauge",
        "ferry_migrations": "gauge",
        "ferry_migration_phase_entries": "counter",
        "ferry_pages_sent": "counter",
        "ferry_page_bytes_sent": "counter",
        "ferry_pages_resent": "counter",
        "ferry_dirty_pages": "counter",
        "ferry_dirty_pages_per_second": "gauge",
        "ferry_leechers_connected": "gauge",
        "ferry_connections": "counter",
        "ferry_reconnects": "counter",
        "ferry_last_migration_downtime_seconds": "gauge",
        "ferry_last_migration_freeze_seconds": "gauge",
        "ferry_errors": "counter",
    ]

    static let hubOnly: [String: String] = [
        "ferry_upstream_pages_fetched": "counter",
        "ferry_upstream_page_bytes_fetched": "counter",
        "ferry_cache_pages_served": "counter",
    ]

    static func phase(_ scrape: Scrape, _ phase: String) -> Double {
        (try? scrape.value("ferry_migrations{phase=\(phase)}")) ?? -1
    }

    @Test(.enabled(if: MetricsScraper.available, MetricsScraper.unavailableReason))
    func aSeederServesMetricsThatMoveWithItsMigration() throws {
        let harness = try CLIHarness()
        let out = "/tmp/ferry-metrics-cli-\(getpid())"
        try? FileManager.default.removeItem(atPath: out)
        defer { try? FileManager.default.removeItem(atPath: out) }
        let child = try Memwriter(["--mib", "64", "--threads", "2", "--rate", "20000", "--pattern"])
        defer { child.stop() }
        let (seeder, address, url) = try startSeeder(harness, pid: child.pid)
        defer { seeder.stop() }

        // Before any leecher: everything present, typed, at rest.
        let idle = try MetricsScraper.once(url)
        #expect(idle.contentType.hasPrefix("text/plain; version=0.0.4"))
        for (name, type) in Self.common { #expect(idle.families[name] == type, "\(name): \(idle.families[name] ?? "missing")") }
        #expect(idle.roles == ["seeder"])
        #expect(try idle.value("ferry_pages_sent_total") == 0)
        #expect(try idle.value("ferry_leechers_connected") == 0)
        #expect(Self.phase(idle, "tracking") == 0)
        #expect(idle.samples["ferry_last_migration_downtime_seconds"] == .some(nil), "NaN before any Finalize")

        // Scrape every 20 ms from before the pull until the seeder exits.
        let watcher = try MetricsScraper.watch(url)
        defer { watcher.child.stop() }
        // A slow pull (one 16-page request at a time) so scrapes see it run.
        let leecher = try harness.startLeecher(address, out: out, ["--in-flight", "1", "--batch-pages", "16"])
        defer { leecher.stop() }
        _ = try leecher.expect("{\"event\":\"complete\"", timeout: 120)
        #expect(leecher.waitForExit() == 0)
        #expect(seeder.waitForExit() == 0)
        let scrapes = try watcher.finish()
        #expect(scrapes.count >= 10, "only \(scrapes.count) scrapes during the migration")

        let sent = scrapes.compactMap { try? $0.value("ferry_pages_sent_total") }
        #expect(sent.count == scrapes.count)
        #expect(zip(sent, sent.dropFirst()).allSatisfy { $0 <= $1 }, "a counter went down: \(sent)")
        #expect(Set(sent).count >= 3, "ferry_pages_sent_total hardly moved: \(Set(sent).sorted())")
        let bytes = scrapes.compactMap { try? $0.value("ferry_page_bytes_sent_total") }
        #expect(zip(bytes, bytes.dropFirst()).allSatisfy { $0 <= $1 } && (bytes.last ?? 0) > 0)
        // The pull: one leecher connected while the process was tracked.
        let pulling = scrapes.filter { Self.phase($0, "tracking") == 1 }
        #expect(!pulling.isEmpty, "no scrape saw the tracking phase")
        #expect(pulling.contains { (try? $0.value("ferry_leechers_connected")) == 1 })
        #expect(scrapes.allSatisfy { ((try? $0.value("ferry_leechers_connected")) ?? 9) <= 1 })
        // The freeze: seen as a phase, then as a downtime figure.
        let frozen = scrapes.filter { Self.phase($0, "frozen") == 1 }
        #expect(!frozen.isEmpty, "no scrape saw the frozen phase")
        if let last = frozen.last {
            let downtime = try last.value("ferry_last_migration_downtime_seconds")
            let freeze = try last.value("ferry_last_migration_freeze_seconds")
            #expect(downtime > 0 && downtime < 5, "downtime \(downtime) s")
            #expect(freeze >= 0 && freeze <= downtime, "freeze \(freeze) s, downtime \(downtime) s")
            #expect(try last.value("ferry_migration_phase_entries_total{phase=frozen}") == 1)
            // Under 20,000 writes/s the scans found dirty pages, and some were sent again.
            #expect(try last.value("ferry_dirty_pages_total") > 0)
        }
        let final = scrapes.last!
        #expect(try final.value("ferry_errors_total{kind=request}") == 0)
        #expect(try final.value("ferry_errors_total{kind=aborted}") == 0)
        #expect(try final.value("ferry_connections_total") >= 1)
        print("metrics: \(scrapes.count) scrapes; pages sent \(Int(sent.last ?? 0)), re-sent \(Int((try? final.value("ferry_pages_resent_total")) ?? -1)), dirty found \(Int((try? final.value("ferry_dirty_pages_total")) ?? -1)), downtime \((try? frozen.last?.value("ferry_last_migration_downtime_seconds")) ?? -1) s")
    }

    func startSeeder(_ harness: CLIHarness, pid: Int32, _ extra: [String] = []) throws -> (ChildProcess, String, String) {
        let seeder = try ChildProcess(builtExecutable("seeder"),
                                      ["serve", "\(pid)", "--listen", "127.0.0.1:0", "--secret-file", harness.secretPath,
                                       "--metrics", "127.0.0.1:0", "--json"] + extra)
        let url = try Self.metricsURL(in: try seeder.expect("{\"event\":\"metrics\""))
        let line = try seeder.expect("{\"event\":\"listening\"")
        guard let range = line.range(of: #"127\.0\.0\.1:\d+"#, options: .regularExpression) else {
            throw TestFailure("no address in \(line)")
        }
        return (seeder, String(line[range]), url)
    }

    @Test(.enabled(if: MetricsScraper.available, MetricsScraper.unavailableReason))
    func aHubServesMetricsForTheMigrationItRelays() throws {
        let harness = try CLIHarness()
        let out = "/tmp/ferry-metrics-hub-\(getpid())"
        try? FileManager.default.removeItem(atPath: out)
        defer { try? FileManager.default.removeItem(atPath: out) }
        let child = try Memwriter(["--mib", "32", "--threads", "1", "--rate", "10000", "--pattern"])
        defer { child.stop() }
        let seeder = try ChildProcess(builtExecutable("seeder"),
                                      ["serve", "\(child.pid)", "--listen", "127.0.0.1:0", "--secret-file", harness.secretPath,
                                       "--grace", "2", "--json"])
        defer { seeder.stop() }
        let seederAddress = try HubCommandLineTests.address(in: try seeder.expect("{\"event\":\"listening\""))
        let hub = try ChildProcess(builtExecutable("hub"),
                                   ["serve", "--upstream", seederAddress, "--listen", "127.0.0.1:0",
                                    "--metrics", "127.0.0.1:0", "--secret-file", harness.secretPath, "--grace", "1", "--json"])
        defer { hub.stop() }
        let url = try Self.metricsURL(in: try hub.expect("{\"event\":\"metrics\""))
        let hubAddress = try HubCommandLineTests.address(in: try hub.expect("{\"event\":\"listening\""))

        let idle = try MetricsScraper.once(url)
        for (name, type) in Self.common.merging(Self.hubOnly, uniquingKeysWith: { a, _ in a }) {
            #expect(idle.families[name] == type, "\(name): \(idle.families[name] ?? "missing")")
        }
        #expect(idle.roles == ["hub"])
        #expect(Self.phase(idle, "tracking") == 1, "the hub relays one migration from the start")
        #expect(try idle.value("ferry_leechers_connected") == 0)

        let leecher = try harness.startLeecher(hubAddress, out: out, ["--in-flight", "1", "--batch-pages", "16"])
        defer { leecher.stop() }
        _ = try leecher.expect("{\"event\":\"progress\"", timeout: 30)
        let during = try MetricsScraper.once(url)
        Thread.sleep(forTimeInterval: 0.3)
        let later = try MetricsScraper.once(url)
        for scrape in [during, later] where Self.phase(scrape, "tracking") == 1 {
            #expect(try scrape.value("ferry_leechers_connected") == 1)
        }
        #expect(try during.value("ferry_pages_sent_total") > 0)
        #expect(try during.value("ferry_upstream_pages_fetched_total") > 0)
        #expect(try later.value("ferry_pages_sent_total") > (try during.value("ferry_pages_sent_total")))
        #expect(try later.value("ferry_page_bytes_sent_total") > (try during.value("ferry_page_bytes_sent_total")))

        _ = try leecher.expect("{\"event\":\"complete\"", timeout: 120)
        #expect(leecher.waitForExit() == 0)
        _ = try hub.expect("{\"event\":\"complete\"", timeout: 30)
        // The hub outlives the migration: its end is in the figures.
        let done = try MetricsScraper.once(url)
        #expect(Self.phase(done, "completed") == 1)
        #expect(Self.phase(done, "tracking") == 0)
        #expect(try done.value("ferry_migration_phase_entries_total{phase=frozen}") == 1)
        #expect(try done.value("ferry_migration_phase_entries_total{phase=completed}") == 1)
        #expect(try done.value("ferry_leechers_connected") == 0)
        #expect(try done.value("ferry_connections_total") >= 1)
        let downtime = try done.value("ferry_last_migration_downtime_seconds")
        #expect(downtime > 0 && downtime < 5, "downtime \(downtime) s")
        let fetched = try done.value("ferry_upstream_pages_fetched_total")
        let sent = try done.value("ferry_pages_sent_total")
        // Every page the leecher got came from the cache, fetched once, or fetched for it.
        #expect(fetched > 0 && sent > 0)
        #expect(try done.value("ferry_cache_pages_served_total") <= sent)
        #expect(try done.value("ferry_errors_total{kind=upstream_lost}") == 0)
        #expect(try done.value("ferry_errors_total{kind=aborted}") == 0)
        print("hub metrics: fetched \(Int(fetched)) pages upstream, sent \(Int(sent)), from cache \(Int((try? done.value("ferry_cache_pages_served_total")) ?? -1)), downtime \(downtime) s")
    }

    /// A bad --metrics value and a port in use fail the command before it
    /// touches the process, naming the address.
    @Test func aBadOrBusyMetricsAddressIsRefusedByName() throws {
        let harness = try CLIHarness()
        let child = try Memwriter(["--mib", "4", "--threads", "1", "--rate", "1000"])
        defer { child.stop() }
        let bad = try ChildProcess(builtExecutable("seeder"),
                                   ["serve", "\(child.pid)", "--listen", "127.0.0.1:0", "--secret-file", harness.secretPath,
                                    "--metrics", "localhost", "--json"])
        let badLine = try bad.expect("{\"event\":\"error\"")
        #expect(badLine.contains("--metrics") && badLine.contains("localhost"), "\(badLine)")
        #expect(bad.waitForExit() == 1)

        let busy = try MetricsServer(listen: "127.0.0.1:0") { "" }
        defer { busy.close() }
        let hub = try ChildProcess(builtExecutable("hub"),
                                   ["serve", "--upstream", "127.0.0.1:1", "--listen", "127.0.0.1:0",
                                    "--metrics", busy.address, "--secret-file", harness.secretPath, "--json"])
        let busyLine = try hub.expect("{\"event\":\"error\"")
        #expect(busyLine.contains(busy.address) && busyLine.contains("in use"), "\(busyLine)")
        #expect(hub.waitForExit() == 1)
        #expect(try harness.isRunning(child))
    }
}
