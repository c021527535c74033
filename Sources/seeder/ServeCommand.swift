import ArgumentParser
import Foundation
import FerryCLI
import FerryMigration

struct ServeCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "serve",
        abstract: "Track a running process and serve its memory to one leecher.",
        discussion: """
            Attaches to PID, waits for a leecher, and on its Track write-protects every \
            migratable region while the process keeps running. Pages are served as the \
            leecher asks; Finalize freezes the process. On Complete the process is left \
            as --then says (default: stopped, never destroyed). If the leecher goes away \
            after the freeze for longer than --grace, the process is thawed and runs on.

            Migrated: private memory (anonymous, heap, stacks, writable private file \
            mappings) and shared memory no file holds (shared anonymous, memfd, System V, \
            /dev/shm), in 4 KiB pages or in huge pages (MAP_HUGETLB, SHM_HUGETLB, \
            MFD_HUGETLB: tracked and sent in whole 2 MiB or 1 GiB pages, their size \
            recorded in the layout). Read-only and shared file mappings are recorded, not copied.

            Exit status: 0 when the migration completed, 1 otherwise.
            """)

    @Argument(help: "The process to migrate.")
    var pid: Int32

    @Option(name: .long, help: ArgumentHelp("Where to listen: HOST:PORT, [IPv6]:PORT or unix:PATH.", valueName: "ADDRESS"))
    var listen = "127.0.0.1:7070"

    @Flag(name: .long, help: "Serve one leecher on standard input/output (for ssh) instead of listening.")
    var stdio = false

    @Option(name: .long, help: ArgumentHelp("Dial out to a hub's seeder address instead of listening (for NAT).", valueName: "HUB:PORT"))
    var via: String?

    @Option(name: .long, help: "The migration's name, which leechers of a hub ask for (default: pid-PID).")
    var name: String?

    @Option(name: .long, help: "What to do with the process after Complete: stop, kill or resume.")
    var then: String = "stop"

    @Option(name: .long, help: ArgumentHelp("Seconds a session survives a lost leecher.", valueName: "SECONDS"))
    var grace = "5"

    @Option(name: .long, help: """
        Dirty tracker: async, sync or soft-dirty (default: the best this kernel has, async on 6.7+). \
        async and soft-dirty are safe to stop the seeder under. With sync the process waits on the \
        seeder for each write it makes: a seeder stopped by SIGSTOP or a debugger hangs it until \
        continued (Ctrl-Z is refused while sync tracks).
        """)
    var tracker: String?

    @Option(name: .long, help: ArgumentHelp(
        "Sign the checksums with this private key, so leechers can pin it through hubs (default: --key).",
        valueName: "FILE"))
    var signingKey: String?

    @OptionGroup var wholeProcess: CriuServeOptions // issue 13: --with-criu, --criu, --criu-dir
    @OptionGroup var bandwidth: BandwidthOptions
    @OptionGroup var auth: AuthOptions
    @OptionGroup var metricsOptions: MetricsOptions
    @OptionGroup var compression: CompressOptions
    @OptionGroup var output: OutputOptions

    func run() async throws {
        // With --stdio, stdout carries the protocol: events go to stderr.
        let reporter = Reporter(command: "seeder", json: output.json, eventsToStandardError: stdio)
        try await runReporting(reporter) {
            tuneAllocatorForBulkFrames()
            guard let thenAction = ThenAction(rawValue: then) else {
                throw ValidationError("--then takes stop, kill or resume; got '\(then)'")
            }
            let trackerKind = try tracker.map { name -> TrackerKind in
                guard let kind = TrackerKind(rawValue: name) else {
                    throw ValidationError("--tracker takes async, sync or soft-dirty; got '\(name)'")
                }
                return kind
            }
            let graceDuration = try parseSeconds(grace, option: "--grace")
            let criu = try wholeProcess.locate() // issue 13
            let connections = Connections(credentials: try auth.credentials(createDefault: true), compression: compression)
            // Check every address before touching the process.
            let hubEndpoint = try via.map { try Endpoint(parsing: $0) }
            let listenEndpoint = try Endpoint(parsing: listen)
            let metrics = try metricsOptions.start(.seeder, reporter: reporter)
            defer { metrics?.close() }
            let (pacer, bandwidthControl) = try bandwidth.start(reporter)
            defer { bandwidthControl?.cancel() }
            // Signals are handled from before the attach: one that arrives
            // while the target runs a system call for us waits until its
            // registers are back, and is then only recorded here.
            let relay = SignalRelay()
            let signals = SignalWatcher(Self.signals) { relay.receive($0) }
            defer { signals.cancel() }
            let process = try TrackedProcess.attach(pid: pid, tracker: trackerKind)
            if let signal = relay.pending {
                try? process.detach()
                throw MigrationError.seeder("interrupted by signal \(signal) while attaching; pid \(pid) was let go untouched and runs on")
            }
            let (source, extraMethods) = try wholeProcess.source(process, criu: criu, grace: graceDuration, reporter: reporter)
            var options = SeederOptions(then: criu == nil ? thenAction : .kill, grace: graceDuration, migration: name ?? "pid-\(pid)")
            options.host = ProcessInfo.processInfo.hostName
            options.signingKey = try (signingKey ?? auth.key).map { try KeyPair.load(path: $0) }
            options.pacer = pacer
            options.extraMethods = extraMethods
            let service = SeederService(source: source, options: options) { event in
                Self.report(event, reporter)
            }
            metrics?.show(service.metrics) { service.metricGauges }
            relay.connect { signal in
                service.abandon("interrupted by signal \(signal)")
            }
            // Ctrl-Z: the sync tracker makes the process wait on us for each
            // write it makes, so a stopped seeder would hang it.
            let stops = SignalWatcher([SIGTSTP]) { _ in Self.stopRequested(process, reporter: reporter) }
            defer { stops.cancel() }

            var listener: Listener? = nil
            if let hub = hubEndpoint {
                reporter.event("dialing", ["hub": .string("\(hub)"), "pid": .int(Int64(pid))],
                               text: "seeder: serving pid \(pid) through the hub at \(hub)")
                Task {
                    await service.dialOut(connect: { try await connections.dial(hub) }, failed: { reason in
                        reporter.event("dial_failed", ["hub": .string("\(hub)"), "reason": .string(reason)],
                                       text: "seeder: cannot reach the hub at \(hub): \(reason)")
                    })
                }
            } else if stdio {
                let transport = Transports.stdio()
                Task {
                    await Self.accept(transport, connections: connections, service: service, reporter: reporter)
                }
            } else {
                let endpoint = listenEndpoint
                let bound = try await Listener.bind(endpoint)
                listener = bound
                reporter.event("listening", ["address": .string("\(bound.endpoint)"), "pid": .int(Int64(pid)),
                                             "tracker": .string(process.trackerKind.rawValue)],
                               text: "seeder: serving pid \(pid) on \(bound.endpoint) (tracker \(process.trackerKind.rawValue))")
                Task {
                    // At most WireLimits.maxPendingHandshakes unauthenticated peers at a time.
                    await connections.accept(on: bound, authenticated: { channel in
                        await Self.serve(channel, service: service, reporter: reporter)
                    }, refused: { peer, error in
                        Self.refused(peer, error, reporter: reporter, service: service)
                    })
                }
            }
            let outcome = await service.outcome()
            // Listening on while draining: a leecher whose Complete reply was
            // lost with its connection resumes to learn the outcome.
            await service.drain()
            listener?.close()
            switch outcome {
            case .completed(let message):
                reporter.event("complete", ["pid": .int(Int64(pid)), "pages_sent": .int(Int64(service.pagesSent)),
                                            "message": .string(message)],
                               text: "seeder: migration complete; \(message)")
            case .aborted(let reason):
                throw MigrationError.seeder("migration aborted: \(reason); pid \(pid) was thawed and runs on")
            }
        }
    }

    /// The signals that end a migration cleanly.
    static let signals = [SIGINT, SIGTERM, SIGHUP]

    /// SIGTSTP (Ctrl-Z): stops the seeder as usual, unless the sync tracker
    /// is tracking. Then every write of the process to a protected page
    /// waits in the kernel until our fault handler answers, so a stopped
    /// seeder would hang the process until continued: refuse, and say why.
    /// (SIGSTOP and a debugger cannot be refused: see `--tracker`'s help.)
    static func stopRequested(_ process: TrackedProcess, reporter: Reporter) {
        if process.trackerKind == .sync && process.isTracking {
            let message = "not stopping: with the sync tracker pid \(process.pid) waits on this seeder for each write it makes, and would hang while the seeder is stopped; Ctrl-C ends the migration and lets pid \(process.pid) run on"
            reporter.event("notice", ["message": .string(message)], text: "seeder: \(message)")
            return
        }
        SignalCatcher.takeDefaultAction(SIGTSTP)
    }

    static func accept(_ transport: FrameTransport, connections: Connections, service: SeederService,
                       reporter: Reporter) async {
        let peer = transport.peerDescription
        do {
            let channel = try await connections.accept(transport)
            await serve(channel, service: service, reporter: reporter)
        } catch {
            refused(peer, error, reporter: reporter, service: service)
        }
    }

    static func serve(_ channel: SecureChannel, service: SeederService, reporter: Reporter) async {
        let peer = channel.peerDescription
        reporter.event("connected", ["peer": .string(peer)], text: "seeder: leecher connected from \(peer)")
        await service.serve(channel)
        if let c = channel.compressionStats {
            // What compression did on this connection's pages (Protocols/wire.md § 5.4).
            reporter.event("compression", ["peer": .string(peer), "mode": .string(channel.compression.rawValue),
                                           "records": .int(Int64(c.attempts)), "compressed": .int(Int64(c.compressedRecords)),
                                           "input_bytes": .int(Int64(c.inputBytes)), "output_bytes": .int(Int64(c.outputBytes)),
                                           "wire_bytes": .int(Int64(c.wireBytes)),
                                           "auto_on_windows": .int(Int64(c.autoOnWindows)), "auto_off_windows": .int(Int64(c.autoOffWindows)),
                                           "auto_trials_failed": .int(Int64(c.autoTrialsFailed))],
                           text: String(format: "seeder: compression (%@) on the connection from %@: %d of %d records compressed, %.1f MB -> %.1f MB",
                                        channel.compression.rawValue, peer, c.compressedRecords, c.attempts,
                                        Double(c.inputBytes) / 1e6, Double(c.outputBytes) / 1e6))
        }
    }

    static func refused(_ peer: String, _ error: any Error, reporter: Reporter, service: SeederService? = nil) {
        service?.metrics.error(.handshake)
        reporter.event("refused", ["peer": .string(peer), "reason": .string("\(error)")],
                       text: "seeder: refused \(peer): \(error)")
    }

    static func report(_ event: SeederEvent, _ reporter: Reporter) {
        switch event {
        case .connected(let peer):
            reporter.event("connected", ["peer": .string(peer)], text: nil)
        case .tracking(let regions, let pages, let tracker):
            reporter.event("tracking", ["regions": .int(Int64(regions)), "pages": .int(Int64(pages)),
                                        "tracker": .string(tracker)],
                           text: "seeder: tracking \(regions) regions, \(pages) pages (\(tracker))")
        case .resumed(let peer, let phase):
            reporter.event("resumed", ["peer": .string(peer), "phase": .string(phase.description)],
                           text: "seeder: \(peer) resumed the session (\(phase))")
        case .disconnected(let peer, let reason):
            reporter.event("disconnected", ["peer": .string(peer), "reason": .string(reason)],
                           text: "seeder: lost \(peer) (\(reason)); waiting for it to resume")
        case .finalized(let freeze, let dirty):
            reporter.event("finalized", ["freeze_ms": .double(freeze), "dirty_pages": .int(Int64(dirty))],
                           text: String(format: "seeder: frozen in %.2f ms; %llu dirty pages", freeze, dirty))
        case .refused(let peer, let reason):
            reporter.event("refused", ["peer": .string(peer), "reason": .string(reason)],
                           text: "seeder: refused \(peer): \(reason)")
        }
    }
}
