// What `seeder serve --metrics` and `hub serve --metrics` expose, in the
// Prometheus text exposition format (version 0.0.4): counters kept in relaxed
// atomics that the hot paths bump (one add per part of pages, never a lock),
// and gauges read from the service's state when a scraper asks. Every name
// has the `ferry_` prefix and its unit (`_bytes_total`, `_seconds`); every
// sample carries `role="seeder"` or `role="hub"`. docs/user-guide.md
// ("Metrics") lists them all; keep that list in step with `families`.
import FerryToolkit
import Synchronization

/// A Prometheus metric type, as the TYPE line says it.
public enum MetricType: String, Sendable {
    /// Only goes up (restarts at zero with the process).
    case counter
    /// Goes up and down.
    case gauge
}

/// One metric family: its name, HELP and TYPE, and its samples.
public struct MetricFamily: Sendable, Equatable {
    public struct Sample: Sendable, Equatable {
        public var labels: [(String, String)]
        public var value: Double

        public init(_ labels: [(String, String)] = [], _ value: Double) {
            self.labels = labels
            self.value = value
        }

        public static func == (a: Sample, b: Sample) -> Bool {
            a.value == b.value && a.labels.map(\.0) == b.labels.map(\.0) && a.labels.map(\.1) == b.labels.map(\.1)
        }
    }

    public var name: String
    public var help: String
    public var type: MetricType
    public var samples: [Sample]

    public init(_ name: String, _ type: MetricType, _ help: String, _ samples: [Sample]) {
        self.name = name
        self.help = help
        self.type = type
        self.samples = samples
    }
}

/// The text exposition format 0.0.4
/// (https://prometheus.io/docs/instrumenting/exposition_formats/).
public enum PrometheusText {
    /// The Content-Type of a scrape's answer.
    public static let contentType = "text/plain; version=0.0.4; charset=utf-8"

    /// `# HELP`, `# TYPE` and one line per sample, for each family.
    public static func encode(_ families: [MetricFamily]) -> String {
        var out = ""
        for family in families {
            out += "# HELP \(family.name) \(escapeHelp(family.help))\n"
            out += "# TYPE \(family.name) \(family.type.rawValue)\n"
            for sample in family.samples {
                out += family.name
                if !sample.labels.isEmpty {
                    out += "{"
                    out += sample.labels.map { "\($0.0)=\"\(escapeLabel($0.1))\"" }.joined(separator: ",")
                    out += "}"
                }
                out += " \(format(sample.value))\n"
            }
        }
        return out
    }

    /// HELP text: backslash and line feed escaped.
    static func escapeHelp(_ text: String) -> String {
        text.replacingAll("\\", with: "\\\\").replacingAll("\n", with: "\\n")
    }

    /// Label values: backslash, double quote and line feed escaped.
    static func escapeLabel(_ text: String) -> String {
        escapeHelp(text).replacingAll("\"", with: "\\\"")
    }

    /// Integers without a fraction, others in Swift's shortest round-trip
    /// form; `+Inf`, `-Inf` and `NaN` as the format spells them.
    static func format(_ value: Double) -> String {
        if value.isNaN { return "NaN" }
        if value.isInfinite { return value > 0 ? "+Inf" : "-Inf" }
        if value == value.rounded(), abs(value) < 1e15 { return String(Int64(value)) }
        return "\(value)"
    }
}

extension String {
    fileprivate func replacingAll(_ target: Character, with replacement: String) -> String {
        guard contains(target) else { return self }
        var out = ""
        for c in self { if c == target { out += replacement } else { out.append(c) } }
        return out
    }
}

/// The kinds of error counted in `ferry_errors_total{kind}`.
public enum MetricsErrorKind: String, Sendable, CaseIterable {
    /// A peer failed the handshake (wrong key or secret, not Ferry, timeout).
    case handshake
    /// A request was answered with an error (bad request, refused, failed read).
    case request
    /// A leecher's connection dropped while its migration was unfinished.
    case connectionLost = "connection_lost"
    /// The hub lost its seeder (or upstream hub).
    case upstreamLost = "upstream_lost"
    /// A migration ended aborted (the source thawed and runs on).
    case aborted
}

/// Which command the metrics describe.
public enum MetricsRole: String, Sendable {
    case seeder
    case hub
}

/// The counters of one `seeder serve` or `hub serve`, bumped where things
/// happen, with relaxed atomic adds only (scrapes need no ordering between
/// counters). Gauges that are state (phase, leechers attached) are read from
/// the service at scrape time instead.
public final class MigrationMetrics: Sendable {
    public let role: MetricsRole
    /// Pages sent in ReadAt replies (seeder: read from the process; hub: to leechers).
    let pagesSent = Atomic<UInt64>(0)
    /// Bytes of those replies' page parts (page data and run headers; zero and hole runs carry no data).
    let pageBytesSent = Atomic<UInt64>(0)
    /// Pages sent that had been sent before (to this leecher, for the hub).
    let pagesResent = Atomic<UInt64>(0)
    /// Hub: pages read from upstream, and the bytes of those replies.
    let upstreamPagesFetched = Atomic<UInt64>(0)
    let upstreamPageBytesFetched = Atomic<UInt64>(0)
    /// Hub: pages a leecher asked for that were already cached at their current version.
    let cachePagesServed = Atomic<UInt64>(0)
    /// Pages found written since they were sent (seeder's scans; hub: upstream reports).
    let dirtyPages = Atomic<UInt64>(0)
    /// The dirty rate at the last scan, pages per second, as Double bits.
    let dirtyRateBits = Atomic<UInt64>(0)
    /// Sessions resumed by a leecher after a lost connection.
    let reconnects = Atomic<UInt64>(0)
    /// Connections accepted (after the handshake).
    let connections = Atomic<UInt64>(0)
    /// Migrations that entered each phase, indexed by `SessionPhase.rawValue`.
    let phaseEntries = (0..<4).map { _ in Counter() }
    /// Errors by `MetricsErrorKind`, in `allCases` order.
    let errors = MetricsErrorKind.allCases.map { _ in Counter() }
    /// Downtime and freeze of the last finalized migration, microseconds; `UInt64.max` until one.
    let lastDowntimeMicroseconds = Atomic<UInt64>(.max)
    let lastFreezeMicroseconds = Atomic<UInt64>(.max)

    /// One counter in a labelled family (an `Atomic` cannot live in an array).
    final class Counter: Sendable {
        let value = Atomic<UInt64>(0)
    }

    public init(role: MetricsRole) {
        self.role = role
    }

    func sent(pages: Int, bytes: Int, resent: Int) {
        pagesSent.add(UInt64(pages), ordering: .relaxed)
        pageBytesSent.add(UInt64(bytes), ordering: .relaxed)
        if resent > 0 { pagesResent.add(UInt64(resent), ordering: .relaxed) }
    }

    func fetchedUpstream(pages: Int, bytes: Int) {
        upstreamPagesFetched.add(UInt64(pages), ordering: .relaxed)
        upstreamPageBytesFetched.add(UInt64(bytes), ordering: .relaxed)
    }

    func servedFromCache(pages: Int) {
        if pages > 0 { cachePagesServed.add(UInt64(pages), ordering: .relaxed) }
    }

    func foundDirty(pages: Int) {
        if pages > 0 { dirtyPages.add(UInt64(pages), ordering: .relaxed) }
    }

    func dirtyRate(_ pagesPerSecond: Double) {
        dirtyRateBits.store(pagesPerSecond.bitPattern, ordering: .relaxed)
    }

    func entered(_ phase: SessionPhase) {
        phaseEntries[Int(phase.rawValue)].value.add(1, ordering: .relaxed)
    }

    func resumed() { reconnects.add(1, ordering: .relaxed) }

    func connected() { connections.add(1, ordering: .relaxed) }

    /// Counts one error of `kind`.
    public func error(_ kind: MetricsErrorKind) {
        errors[MetricsErrorKind.allCases.firstIndex(of: kind)!].value.add(1, ordering: .relaxed)
    }

    func finalized(downtime: Duration, freezeMicroseconds: UInt64) {
        lastDowntimeMicroseconds.store(UInt64(clamping: downtime.wholeMicroseconds), ordering: .relaxed)
        lastFreezeMicroseconds.store(freezeMicroseconds, ordering: .relaxed)
    }

    /// What the service knows only as state, read at scrape time.
    public struct Gauges: Sendable {
        /// How many migrations are in each phase now.
        public var migrationsByPhase: [SessionPhase: Int] = [:]
        /// Leechers holding a session with a live connection.
        public var leechersConnected = 0
        public init() {}
    }

    /// Every family, in a fixed order, with the gauges the service read.
    public func families(_ gauges: Gauges) -> [MetricFamily] {
        let role = ("role", self.role.rawValue)
        func counter(_ name: String, _ help: String, _ value: borrowing Atomic<UInt64>) -> MetricFamily {
            MetricFamily(name, .counter, help, [.init([role], Double(value.load(ordering: .relaxed)))])
        }
        let phases: [SessionPhase] = [.tracking, .frozen, .completed, .aborted]
        var out: [MetricFamily] = [
            MetricFamily("ferry_info", .gauge, "Always 1; the labels say which command and version answer.",
                         [.init([role, ("version", ferryVersion)], 1)]),
            MetricFamily("ferry_migrations", .gauge,
                         "Migrations in each phase now (tracking: pre-copy while the source runs; frozen: after Finalize; completed; aborted).",
                         phases.map { .init([role, ("phase", $0.description)], Double(gauges.migrationsByPhase[$0] ?? 0)) }),
            MetricFamily("ferry_migration_phase_entries_total", .counter,
                         "Times a migration entered each phase.",
                         phases.map { .init([role, ("phase", $0.description)], Double(phaseEntries[Int($0.rawValue)].value.load(ordering: .relaxed))) }),
            counter("ferry_pages_sent_total", "Pages sent in ReadAt replies (seeder: read from the process; hub: to its leechers).", pagesSent),
            counter("ferry_page_bytes_sent_total", "Bytes of the page parts of ReadAt replies, before encryption (zero and unbacked pages carry no data).", pageBytesSent),
            counter("ferry_pages_resent_total", "Pages sent again: written since they were sent before (hub: to the same leecher).", pagesResent),
            counter("ferry_dirty_pages_total", "Pages found written since they were sent (seeder: its scans; hub: upstream's dirty reports).", dirtyPages),
            MetricFamily("ferry_dirty_pages_per_second", .gauge, "The dirty rate at the last scan or dirty report, pages per second.",
                         [.init([role], Double(bitPattern: dirtyRateBits.load(ordering: .relaxed)))]),
            MetricFamily("ferry_leechers_connected", .gauge, "Leechers holding a session over a live connection now.",
                         [.init([role], Double(gauges.leechersConnected))]),
            counter("ferry_connections_total", "Authenticated leecher connections accepted.", connections),
            counter("ferry_reconnects_total", "Sessions a leecher resumed after its connection dropped.", reconnects),
        ]
        if self.role == .hub {
            out += [
                counter("ferry_upstream_pages_fetched_total", "Pages the hub read from its seeder (or upstream hub).", upstreamPagesFetched),
                counter("ferry_upstream_page_bytes_fetched_total", "Bytes of the page parts the hub read from upstream.", upstreamPageBytesFetched),
                counter("ferry_cache_pages_served_total", "Pages served to leechers from the hub's cache without asking upstream.", cachePagesServed),
            ]
        }
        let downtime = lastDowntimeMicroseconds.load(ordering: .relaxed)
        let freeze = lastFreezeMicroseconds.load(ordering: .relaxed)
        out += [
            MetricFamily("ferry_last_migration_downtime_seconds", .gauge,
                         "Last migration: from the start of the freeze until the Finalize reply was ready to send (the source's share of the downtime; the hub's figure includes its upstream round trip). NaN before any Finalize.",
                         [.init([role], downtime == .max ? .nan : Double(downtime) / 1e6)]),
            MetricFamily("ferry_last_migration_freeze_seconds", .gauge,
                         "Last migration: time to stop every thread of the source. NaN before any Finalize.",
                         [.init([role], freeze == .max ? .nan : Double(freeze) / 1e6)]),
            MetricFamily("ferry_errors_total", .counter, "Errors by kind: handshake, request, connection_lost, upstream_lost, aborted.",
                         MetricsErrorKind.allCases.enumerated().map { i, kind in
                             .init([role, ("kind", kind.rawValue)], Double(errors[i].value.load(ordering: .relaxed)))
                         }),
        ]
        return out
    }
}
