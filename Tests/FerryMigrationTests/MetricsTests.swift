// The text encoding of `--metrics` (PrometheusText, MigrationMetrics) and the
// bounds of its HTTP server (MetricsServer): what a hostile scraper can hold.
import Foundation
import Glibc
import Testing
import FerryTestSupport
@testable import FerryMigration

@Suite struct MetricsTests {
    // MARK: Text format

    @Test func familiesEncodeWithHelpTypeLabelsAndEscapes() {
        let text = PrometheusText.encode([
            MetricFamily("ferry_x_total", .counter, "Things \\ done.\nTwo lines.", [
                .init([("role", "seeder"), ("kind", "a\"b\\c\nd")], 3),
            ]),
            MetricFamily("ferry_y_seconds", .gauge, "A gauge.", [
                .init([], 0.25), .init([("phase", "nan")], .nan), .init([("phase", "inf")], .infinity),
            ]),
        ])
        #expect(text == """
            # HELP ferry_x_total Things \\\\ done.\\nTwo lines.
            # TYPE ferry_x_total counter
            ferry_x_total{role="seeder",kind="a\\"b\\\\c\\nd"} 3
            # HELP ferry_y_seconds A gauge.
            # TYPE ferry_y_seconds gauge
            ferry_y_seconds 0.25
            ferry_y_seconds{phase="nan"} NaN
            ferry_y_seconds{phase="inf"} +Inf

            """)
        #expect(PrometheusText.format(12_345_678_901) == "12345678901")
        #expect(PrometheusText.format(-2) == "-2")
    }

    @Test func countersAndGaugesFollowWhatHappened() throws {
        let metrics = MigrationMetrics(role: .hub)
        metrics.sent(pages: 10, bytes: 40_000, resent: 2)
        metrics.sent(pages: 5, bytes: 100, resent: 0)
        metrics.fetchedUpstream(pages: 7, bytes: 28_700)
        metrics.servedFromCache(pages: 8)
        metrics.foundDirty(pages: 4)
        metrics.dirtyRate(123.5)
        metrics.entered(.tracking)
        metrics.entered(.frozen)
        metrics.resumed()
        metrics.connected()
        metrics.error(.handshake)
        metrics.error(.handshake)
        metrics.error(.upstreamLost)
        metrics.finalized(downtime: .milliseconds(3), freezeMicroseconds: 150)
        var gauges = MigrationMetrics.Gauges()
        gauges.migrationsByPhase = [.frozen: 2]
        gauges.leechersConnected = 3
        let families = metrics.families(gauges)
        func value(_ name: String, _ label: (String, String)? = nil) throws -> Double {
            guard let family = families.first(where: { $0.name == name }) else { throw TestFailure("no \(name)") }
            let sample = family.samples.first { s in label.map { l in s.labels.contains { $0 == l } } ?? true }
            guard let sample else { throw TestFailure("no \(name) \(String(describing: label))") }
            #expect(sample.labels.first?.0 == "role" && sample.labels.first?.1 == "hub")
            return sample.value
        }
        #expect(try value("ferry_pages_sent_total") == 15)
        #expect(try value("ferry_page_bytes_sent_total") == 40_100)
        #expect(try value("ferry_pages_resent_total") == 2)
        #expect(try value("ferry_upstream_pages_fetched_total") == 7)
        #expect(try value("ferry_upstream_page_bytes_fetched_total") == 28_700)
        #expect(try value("ferry_cache_pages_served_total") == 8)
        #expect(try value("ferry_dirty_pages_total") == 4)
        #expect(try value("ferry_dirty_pages_per_second") == 123.5)
        #expect(try value("ferry_reconnects_total") == 1)
        #expect(try value("ferry_connections_total") == 1)
        #expect(try value("ferry_leechers_connected") == 3)
        #expect(try value("ferry_migrations", ("phase", "frozen")) == 2)
        #expect(try value("ferry_migrations", ("phase", "tracking")) == 0)
        #expect(try value("ferry_migration_phase_entries_total", ("phase", "frozen")) == 1)
        #expect(try value("ferry_errors_total", ("kind", "handshake")) == 2)
        #expect(try value("ferry_errors_total", ("kind", "upstream_lost")) == 1)
        #expect(try value("ferry_errors_total", ("kind", "request")) == 0)
        #expect(try value("ferry_last_migration_downtime_seconds") == 0.003)
        #expect(try value("ferry_last_migration_freeze_seconds") == 0.00015)
        // House rules: the prefix, units in names, counters end in _total, gauges never do.
        for family in families {
            #expect(family.name.hasPrefix("ferry_"))
            #expect(family.name.hasSuffix("_total") == (family.type == .counter), "\(family.name)")
            #expect(!family.help.isEmpty)
        }
        // A seeder has no hub-only families, and no figure before a Finalize.
        let seeder = MigrationMetrics(role: .seeder).families(.init())
        #expect(!seeder.contains { $0.name.hasPrefix("ferry_upstream_") || $0.name.hasPrefix("ferry_cache_") })
        #expect(seeder.first { $0.name == "ferry_last_migration_downtime_seconds" }!.samples[0].value.isNaN)
    }

    /// The encoding, escapes and NaN included, is what a real client parses.
    @Test(.enabled(if: MetricsScraper.available, MetricsScraper.unavailableReason))
    func prometheusClientParsesTheEncoding() throws {
        let metrics = MigrationMetrics(role: .hub)
        metrics.sent(pages: 3, bytes: 12_288, resent: 1)
        metrics.error(.request)
        let server = try MetricsServer(listen: "127.0.0.1:0") {
            PrometheusText.encode(metrics.families(.init()) + [
                MetricFamily("ferry_test_escapes", .gauge, "Odd \"label\" \\ values\nhere.",
                             [.init([("role", "hub"), ("v", "a\"b\\c\nd")], 1.5)]),
            ])
        }
        defer { server.close() }
        let scrape = try MetricsScraper.once("http://\(server.address)/metrics")
        #expect(scrape.contentType == "text/plain; version=0.0.4; charset=utf-8")
        #expect(scrape.families["ferry_pages_sent"] == "counter")
        #expect(scrape.families["ferry_migrations"] == "gauge")
        #expect(try scrape.value("ferry_pages_sent_total") == 3)
        #expect(try scrape.value("ferry_pages_resent_total") == 1)
        #expect(try scrape.value("ferry_errors_total{kind=request}") == 1)
        #expect(try scrape.value("ferry_test_escapes{v=a\"b\\c\nd}") == 1.5)
        #expect(scrape.samples["ferry_last_migration_downtime_seconds"] == .some(nil))
        #expect(scrape.roles == ["hub"])
    }

    // MARK: HTTP server

    static func connect(_ address: String) throws -> Int32 {
        let port = UInt16(address.split(separator: ":").last!)!
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        var timeout = timeval(tv_sec: 5, tv_usec: 0)
        _ = setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        var sin = sockaddr_in()
        sin.sin_family = sa_family_t(AF_INET)
        sin.sin_addr.s_addr = inet_addr("127.0.0.1")
        sin.sin_port = port.bigEndian
        let rc = withUnsafePointer(to: &sin) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
        guard rc == 0 else { close(fd); throw TestFailure("cannot connect to \(address): errno \(errno)") }
        return fd
    }

    static func send(_ fd: Int32, _ text: String) {
        let bytes = Array(text.utf8)
        var offset = 0
        while offset < bytes.count {
            let n = bytes.withUnsafeBytes { Glibc.send(fd, $0.baseAddress! + offset, bytes.count - offset, Int32(MSG_NOSIGNAL)) }
            if n <= 0 { return }
            offset += n
        }
    }

    /// Everything until the server closes (or 5 s pass: the receive timeout).
    static func readAll(_ fd: Int32) -> String {
        var out: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 4096)
        while true {
            let n = recv(fd, &chunk, chunk.count, 0)
            if n <= 0 { break }
            out += chunk[..<n]
        }
        return String(decoding: out, as: UTF8.self)
    }

    static func request(_ address: String, _ text: String) throws -> String {
        let fd = try connect(address)
        defer { close(fd) }
        send(fd, text)
        return readAll(fd)
    }

    @Test func onlyGetMetricsIsAnswered() throws {
        let server = try MetricsServer(listen: "127.0.0.1:0") { "ferry_up 1\n" }
        defer { server.close() }
        let ok = try Self.request(server.address, "GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: */*\r\n\r\n")
        #expect(ok.hasPrefix("HTTP/1.1 200 OK\r\n"))
        #expect(ok.contains("Content-Type: text/plain; version=0.0.4; charset=utf-8\r\n"))
        #expect(ok.contains("Content-Length: 11\r\n"))
        #expect(ok.hasSuffix("\r\n\r\nferry_up 1\n"))
        let query = try Self.request(server.address, "GET /metrics?name[]=x HTTP/1.0\n\n")
        #expect(query.hasPrefix("HTTP/1.1 200 OK\r\n"))
        let head = try Self.request(server.address, "HEAD /metrics HTTP/1.1\r\n\r\n")
        #expect(head.hasPrefix("HTTP/1.1 200 OK\r\n") && head.hasSuffix("\r\n\r\n"))
        #expect(try Self.request(server.address, "GET / HTTP/1.1\r\n\r\n").hasPrefix("HTTP/1.1 404 Not Found\r\n"))
        #expect(try Self.request(server.address, "GET /metricsx HTTP/1.1\r\n\r\n").hasPrefix("HTTP/1.1 404 Not Found\r\n"))
        #expect(try Self.request(server.address, "POST /metrics HTTP/1.1\r\n\r\n").hasPrefix("HTTP/1.1 405 Method Not Allowed\r\n"))
        #expect(try Self.request(server.address, "hello\r\n\r\n").hasPrefix("HTTP/1.1 400 Bad Request\r\n"))
    }

    @Test func anOversizedRequestIsRefusedBeforeItGrows() throws {
        var limits = MetricsServerLimits()
        limits.maxRequestBytes = 1024
        let server = try MetricsServer(listen: "127.0.0.1:0", limits: limits) { "ferry_up 1\n" }
        defer { server.close() }
        let fd = try Self.connect(server.address)
        defer { close(fd) }
        // A header that never ends: the server answers 431 once past the
        // limit and closes, whatever more the client sends.
        Self.send(fd, "GET /metrics HTTP/1.1\r\nX-Filler: " + String(repeating: "a", count: 4096))
        let answer = Self.readAll(fd)
        #expect(answer.hasPrefix("HTTP/1.1 431 "), "\(answer.prefix(80))")
        #expect(try Self.request(server.address, "GET /metrics HTTP/1.1\r\n\r\n").hasPrefix("HTTP/1.1 200 OK"))
    }

    @Test func slowClientsAreDroppedAndCannotPinTheServer() throws {
        var limits = MetricsServerLimits()
        limits.maxConnections = 2
        limits.timeout = .milliseconds(400)
        let server = try MetricsServer(listen: "127.0.0.1:0", limits: limits) { "ferry_up 1\n" }
        defer { server.close() }
        // Two clients take every slot and dribble half a request.
        let slow = try (0..<2).map { _ in try Self.connect(server.address) }
        defer { slow.forEach { close($0) } }
        for fd in slow { Self.send(fd, "GET /met") }
        // A real scrape waits in the backlog until the slow ones time out, then is answered.
        let start = ContinuousClock.now
        let answer = try Self.request(server.address, "GET /metrics HTTP/1.1\r\n\r\n")
        let waited = ContinuousClock.now - start
        #expect(answer.hasPrefix("HTTP/1.1 200 OK"))
        #expect(waited < .seconds(3), "the scrape waited \(waited)")
        // The slow clients were hung up on, with no answer.
        for fd in slow {
            let start = ContinuousClock.now
            #expect(Self.readAll(fd).isEmpty)
            #expect(ContinuousClock.now - start < .seconds(3))
        }
        // A client that connects and says nothing is dropped too; the server goes on.
        let idle = try Self.connect(server.address)
        defer { close(idle) }
        Thread.sleep(forTimeInterval: 0.6)
        #expect(Self.readAll(idle).isEmpty)
        #expect(try Self.request(server.address, "GET /metrics HTTP/1.1\r\n\r\n").hasPrefix("HTTP/1.1 200 OK"))
    }

    @Test func badAddressesAndABusyPortAreNamed() throws {
        for text in ["localhost", "127.0.0.1:99999", "unix:/tmp/ferry-metrics.sock", ""] {
            do {
                let server = try MetricsServer(listen: text) { "" }
                server.close()
                Issue.record("\(text) was accepted")
            } catch let error as MetricsServerError {
                #expect("\(error)".hasPrefix("--metrics takes HOST:PORT"), "\(error)")
                #expect("\(error)".contains("\"\(text)\""), "\(error)")
            }
        }
        let first = try MetricsServer(listen: "127.0.0.1:0") { "" }
        defer { first.close() }
        #expect(throws: MetricsServerError.self) { try MetricsServer(listen: first.address) { "" } }
        do {
            _ = try MetricsServer(listen: first.address) { "" }
        } catch {
            #expect("\(error)".contains("cannot serve metrics on \(first.address)"), "\(error)")
            #expect("\(error)".contains("in use"), "\(error)")
        }
        // Closing twice is harmless, and frees the port.
        first.close()
        first.close()
        let again = try MetricsServer(listen: first.address) { "" }
        again.close()
    }
}
