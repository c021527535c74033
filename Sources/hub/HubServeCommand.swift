import ArgumentParser
import Foundation
import FerryCLI
import FerryMigration

struct HubServeCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "serve",
        abstract: "Relay migrations: pull each page once from the seeder, serve it to every leecher.",
        discussion: """
            Leechers connect to --listen exactly as to a seeder (`leecher pull HUB:PORT \
            [--migration NAME]`). Upstream, the hub either dials seeders (--upstream, \
            repeatable; a seeder or another hub) or accepts seeders that dial out to it \
            (--seeders-listen, with `seeder serve PID --via HUB:PORT`), which is how peers \
            behind NAT meet. The source freezes once for all leechers, when --finalize says.

            What a hub sees: every page it relays, in clear, and the layout: run it where \
            you would run the seeder. A leecher that pins the seeder's key \
            (`leecher pull --seeder-key`, with `seeder serve --signing-key`) catches a hub \
            that alters pages or poses as the source; one that does not pin it catches \
            altered pages only while the hub forwards the seeder's checksums.
            """)

    @Option(name: .long, help: ArgumentHelp("Where leechers connect: HOST:PORT, [IPv6]:PORT or unix:PATH.", valueName: "ADDRESS"))
    var listen = "127.0.0.1:7080"

    @Option(name: .long, help: ArgumentHelp("A seeder (or hub) to pull from; repeatable.", valueName: "ADDRESS"))
    var upstream: [String] = []

    @Option(name: .long, help: ArgumentHelp("Where seeders dial in (seeder serve --via).", valueName: "ADDRESS"))
    var seedersListen: String?

    @Option(name: .long, help: "When the source freezes: when-all-ready, first or manual (SIGUSR1).")
    var finalize = "when-all-ready"

    @Option(name: .long, help: ArgumentHelp("Cached pages kept in memory, in MiB; more spills to disk.", valueName: "MIB"))
    var memoryLimit = 1024

    @Option(name: .long, help: ArgumentHelp("Seconds a leecher's session survives a lost connection.", valueName: "SECONDS"))
    var grace = "5"

    @OptionGroup var bandwidth: BandwidthOptions
    @OptionGroup var auth: AuthOptions
    @OptionGroup var compression: CompressOptions
    @OptionGroup var upstreamAuth: UpstreamAuthOptions
    @OptionGroup var metricsOptions: MetricsOptions
    @OptionGroup var output: OutputOptions

    func validate() throws {
        if upstream.isEmpty && seedersListen == nil {
            throw ValidationError("name a seeder with --upstream ADDRESS, or let seeders dial in with --seeders-listen ADDRESS")
        }
        guard memoryLimit >= 0 else { throw ValidationError("--memory-limit cannot be negative") }
    }

    func run() async throws {
        let reporter = Reporter(command: "hub", json: output.json)
        try await runReporting(reporter) {
            tuneAllocatorForBulkFrames()
            guard let policy = HubFinalizePolicy(rawValue: finalize) else {
                throw ValidationError("--finalize takes when-all-ready, first or manual; got '\(finalize)'")
            }
            var options = HubOptions()
            options.finalize = policy
            options.memoryLimit = memoryLimit << 20
            options.grace = try parseSeconds(grace, option: "--grace")
            let (pacer, bandwidthControl) = try bandwidth.start(reporter)
            defer { bandwidthControl?.cancel() }
            options.pacer = pacer
            let leechers = Connections(credentials: try auth.credentials(createDefault: true), compression: compression)
            let seeders = Connections(credentials: try upstreamAuth.credentials(fallback: auth), compression: compression)
            let metrics = try metricsOptions.start(.hub, reporter: reporter)
            defer { metrics?.close() }
            let hub = HubService(options: options) { event in Self.report(event, reporter) }
            metrics?.show(hub.metrics) { hub.metricGauges }
            let signals = SignalWatcher([SIGUSR1]) { _ in hub.finalizeNow() }
            defer { signals.cancel() }

            for address in upstream {
                let endpoint = try Endpoint(parsing: address)
                try await hub.addUpstream(connect: { try await seeders.dial(endpoint) })
            }
            if let seedersListen {
                let listener = try await Listener.bind(try Endpoint(parsing: seedersListen))
                reporter.event("listening", ["address": .string("\(listener.endpoint)"), "side": .string("seeders")],
                               text: "hub: seeders dial in at \(listener.endpoint)")
                Task {
                    // At most WireLimits.maxPendingHandshakes unauthenticated peers at a time.
                    await seeders.accept(on: listener, authenticated: { channel in
                        do {
                            try await hub.acceptSeeder(channel)
                        } catch {
                            channel.close()
                            Self.refused(channel.peerDescription, error, reporter, seeder: true)
                        }
                    }, refused: { peer, error in
                        hub.metrics.error(.handshake)
                        Self.refused(peer, error, reporter, seeder: true)
                    })
                }
            }
            let listener = try await Listener.bind(try Endpoint(parsing: listen))
            reporter.event("listening", ["address": .string("\(listener.endpoint)"), "side": .string("leechers")],
                           text: "hub: leechers connect at \(listener.endpoint) (finalize \(policy.rawValue))")
            await leechers.accept(on: listener, authenticated: { channel in
                await hub.serve(channel)
            }, refused: { peer, error in
                hub.metrics.error(.handshake)
                Self.refused(peer, error, reporter)
            })
        }
    }

    static func refused(_ peer: String, _ error: any Error, _ reporter: Reporter, seeder: Bool = false) {
        reporter.event("refused", ["peer": .string(peer), "reason": .string("\(error)")],
                       text: "hub: refused \(seeder ? "seeder " : "")\(peer): \(error)")
    }

    static func report(_ event: HubEvent, _ reporter: Reporter) {
        switch event {
        case .upstream(let migration, let pid, let host):
            reporter.event("upstream", ["migration": .string(migration), "pid": .int(Int64(pid)), "host": .string(host)],
                           text: "hub: relaying migration '\(migration)' (pid \(pid) on \(host))")
        case .leecherJoined(let peer, let migration):
            reporter.event("leecher_joined", ["peer": .string(peer), "migration": .string(migration)],
                           text: "hub: \(peer) joined '\(migration)'")
        case .leecherLeft(let peer, let reason):
            reporter.event("leecher_left", ["peer": .string(peer), "reason": .string(reason)],
                           text: "hub: \(peer) left (\(reason))")
        case .waitingToFinalize(let ready, let attached):
            reporter.event("waiting_to_finalize", ["ready": .int(Int64(ready)), "attached": .int(Int64(attached))],
                           text: "hub: \(ready) of \(attached) leechers ready to finalize")
        case .finalized(let migration, let freeze, let dirty):
            reporter.event("finalized", ["migration": .string(migration), "freeze_ms": .double(freeze),
                                         "dirty_pages": .int(Int64(dirty))],
                           text: String(format: "hub: '%@' frozen in %.2f ms, %llu dirty pages", migration, freeze, dirty))
        case .upstreamLost(let migration, let reason):
            reporter.event("upstream_lost", ["migration": .string(migration), "reason": .string(reason)],
                           text: "hub: lost the seeder of '\(migration)': \(reason)")
        case .abandoned(let migration, let message):
            reporter.event("abandoned", ["migration": .string(migration), "message": .string(message)],
                           text: "hub: every leecher left '\(migration)' after the freeze; the seeder was told to abort: \(message)")
        case .completed(let migration, let message):
            reporter.event("complete", ["migration": .string(migration), "message": .string(message)],
                           text: "hub: '\(migration)' complete; \(message)")
        }
    }
}
