// `--metrics HOST:PORT`, shared by `seeder serve` and `hub serve`: a
// Prometheus endpoint at http://HOST:PORT/metrics (Metrics.swift lists what
// it holds, MetricsServer.swift how it is bounded). The address is bound
// before anything else happens, so a bad value or a port in use fails the
// command before it touches the process.
import ArgumentParser
import FerryMigration
import Synchronization

public struct MetricsOptions: ParsableArguments {
    @Option(name: .long, help: ArgumentHelp("""
        Serve Prometheus metrics at http://HOST:PORT/metrics (text format 0.0.4; port 0 picks a \
        free one, named in the 'metrics' event): migrations by phase, pages and bytes sent and \
        re-sent, the dirty rate, leechers connected, reconnects, the last downtime, errors by kind \
        (docs/user-guide.md, "Metrics"). Unauthenticated and read-only: bind it to 127.0.0.1 or a \
        private network.
        """, valueName: "HOST:PORT"))
    public var metrics: String?

    public init() {}

    /// Binds `--metrics` and starts serving (nil without it). Until
    /// `MetricsEndpoint.show` names what to render, scrapes get only
    /// `ferry_info`.
    public func start(_ role: MetricsRole, reporter: Reporter) throws -> MetricsEndpoint? {
        guard let metrics else { return nil }
        let endpoint = MetricsEndpoint(role)
        let server = try MetricsServer(listen: metrics) { [endpoint] in endpoint.render() }
        endpoint.server = server
        reporter.event("metrics", ["address": .string(server.address), "url": .string("http://\(server.address)/metrics")],
                       text: "\(role.rawValue): metrics at http://\(server.address)/metrics")
        return endpoint
    }
}

/// A running metrics endpoint and what it shows.
public final class MetricsEndpoint: Sendable {
    private let role: MetricsRole
    private let families = Mutex<(@Sendable () -> [MetricFamily])?>(nil)
    private let serverBox = Mutex<MetricsServer?>(nil)

    init(_ role: MetricsRole) { self.role = role }

    fileprivate var server: MetricsServer? {
        get { serverBox.withLock { $0 } }
        set { serverBox.withLock { $0 = newValue } }
    }

    /// From now on, scrapes show `metrics` with the gauges `gauges` reads.
    public func show(_ metrics: MigrationMetrics, gauges: @escaping @Sendable () -> MigrationMetrics.Gauges) {
        families.withLock { $0 = { metrics.families(gauges()) } }
    }

    func render() -> String {
        let source = families.withLock { $0 }
        return PrometheusText.encode(source?() ?? [MigrationMetrics(role: role).families(.init())[0]])
    }

    /// Stops serving.
    public func close() { server?.close() }
}
