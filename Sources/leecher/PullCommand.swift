import ArgumentParser
import Foundation
import Synchronization
import FerryCLI
import FerryMigration

struct PullCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "pull",
        abstract: "Migrate a process's memory from a seeder into an image directory.",
        discussion: """
            Pulls pages in the background while the source runs, in the order the \
            heuristic chooses, and asks which pulled pages were written since. When the \
            finalize policy is met, the seeder freezes the source and sends the dirty set; \
            the rest is fetched by post-copy, checked against the frozen source, and the \
            image is written to --out (format: Protocols/image.md). A lost connection is \
            resumed within the seeder's grace period.

            Finalize policy: whichever rule fires first finalizes, and the `finalizing` \
            event names it: --finalize-at (share of pages held clean); --max-downtime \
            (the estimated post-freeze transfer: what post-copy would still fetch, at the \
            measured link rate); only hot pages left (pages written again after each send \
            are not re-sent, they wait for the end); after the first pass, pages going \
            stale so fast that re-sending cannot bring the rest under --max-downtime; --max-precopy \
            (bytes moved before the freeze, as a multiple of the memory size); and \
            --max-wait as a deadline. The image is byte-exact whatever the rule: the \
            freeze returns the dirty set and post-copy fetches it.

            Exit status: 0 only when the image is complete and verified.
            """)

    @Argument(help: ArgumentHelp(
        "The seeder (or hub): HOST:PORT, [IPv6]:PORT, unix:PATH, or exec:COMMAND to speak to a command's stdin/stdout (exec:ssh src seeder serve --stdio PID).",
        valueName: "ADDRESS"))
    var address: String

    @Option(name: .long, help: ArgumentHelp("Finalize when this share of pages is held clean (0% = pure post-copy).", valueName: "PCT"))
    var finalizeAt = "95%"

    @Option(name: .long, help: ArgumentHelp("Finalize once the estimated post-freeze transfer fits in this many milliseconds (what the destination waits for is only the Finalize round trip: post-copy fetches the rest while it runs).", valueName: "MS"))
    var maxDowntime: Double = FinalizePolicy.defaultMaxDowntimeMilliseconds

    @Option(name: .long, help: ArgumentHelp("Finalize once pre-copy has moved this multiple of the memory size (1.5x), or inf for no bound; post-copy moves the rest.", valueName: "RATIO"))
    var maxPrecopy = "1.5x"

    @Option(name: .long, help: ArgumentHelp("Finalize after this many seconds of pulling, whatever the state.", valueName: "SECONDS"))
    var maxWait: Double?

    @Option(name: .long, help: ArgumentHelp("Image directory to write; must not exist or be empty.", valueName: "DIR"))
    var out = "ferry-image"

    @Option(name: .long, help: ArgumentHelp(
        "Instead of an image, place the memory into this running process on this host (for example a restored program), mapped at the source's addresses where free; it may use the memory as soon as Finalize returns, and owns it afterwards (docs/postcopy.md). Huge pages (hugetlb) are mapped with pages of their size and filled whole; this host needs free huge pages for them, checked before anything is pulled.",
        valueName: "PID"))
    var into: Int32?

    @Option(name: .long, help: ArgumentHelp(
        "With --into: ask the scheduler for this slice, in microseconds, for the leecher's and the target's threads while post-copy runs (kernel 6.12+), so a thread whose page lands is not kept waiting by busy programs; the target's default comes back at the end. 100 suits a busy host (docs/postcopy.md).",
        valueName: "MICROSECONDS"))
    var sliceUs: Int?

    @Option(name: .long, help: "Pull order: sequential, stack-heap-first, cold-first or profile:FILE.")
    var heuristic = "sequential"

    @Option(name: .long, help: "Through a hub relaying several migrations: the one to pull (its seeder's --name).")
    var migration = ""

    @Option(name: .long, help: "ReadAt requests in flight.")
    var inFlight = 16

    @Option(name: .long, help: "Pages per ReadAt request (1 to 1024); by default it adapts to the link.")
    var batchPages: Int?

    @Flag(name: .long, help: "Skip comparing the image with the frozen source's checksums.")
    var noVerify = false

    @Flag(name: .long, help: "Abort instead of Complete at the end: the source is thawed and runs on (a dry run).")
    var dryRun = false

    @Option(name: .long, help: ArgumentHelp(
        "Pin the source: its signature over the checksums must verify with this key (its .pub line, or the file), through any hubs.",
        valueName: "KEY|FILE"))
    var seederKey: String?

    @Option(name: .long, help: ArgumentHelp(
        "With --seeder-key: refuse signed checksums of a freeze more than this many seconds before the pull started (a hub replaying an earlier migration). Late joiners of a hub may need more.",
        valueName: "SECONDS"))
    var maxFreezeAge: Double = 600

    @OptionGroup var wholeProcess: RestoreOptions // issue 13: --restore, --images, --criu
    @OptionGroup var bandwidth: BandwidthOptions
    @OptionGroup var auth: AuthOptions
    @OptionGroup var compression: CompressOptions
    @OptionGroup var output: OutputOptions

    func validate() throws {
        if let batchPages, !(1...1024).contains(batchPages) { throw ValidationError("--batch-pages takes 1 to 1024") }
        guard (1...1024).contains(inFlight) else { throw ValidationError("--in-flight takes 1 to 1024") }
        guard maxDowntime >= 0, maxDowntime.isFinite else { throw ValidationError("--max-downtime takes 0 or more milliseconds") }
        do {
            _ = try FinalizePolicy.parseRatio(maxPrecopy)
        } catch {
            throw ValidationError("--max-precopy: \(error)")
        }
        if let maxWait, maxWait < 0 { throw ValidationError("--max-wait cannot be negative") }
        guard maxFreezeAge >= 0, maxFreezeAge.isFinite else { throw ValidationError("--max-freeze-age must be 0 or more seconds") }
        if let sliceUs {
            guard into != nil else { throw ValidationError("--slice-us applies to post-copy into a process: use it with --into PID") }
            guard (50...100_000).contains(sliceUs) else { throw ValidationError("--slice-us takes 50 to 100000 microseconds") }
        }
        try wholeProcess.validate(into: into)
        if seederKey != nil && noVerify {
            throw ValidationError("--seeder-key checks the seeder's signed checksums, which --no-verify skips; drop one of them")
        }
    }

    func run() async throws {
        let reporter = Reporter(command: "leecher", json: output.json)
        try await runReporting(reporter) {
            // The target of --into is attached only after Finalize, when the
            // source is already frozen: refuse a target we could not attach
            // to now, before connecting, so a typo costs the source nothing.
            if let into { try TrackedProcess.checkAttachable(pid: into) }
            let criuRestore = try wholeProcess.make(grace: .seconds(30), reporter: reporter) // issue 13
            tuneAllocatorForBulkFrames()
            var options = LeecherOptions()
            options.policy = FinalizePolicy(cleanShare: try FinalizePolicy.parsePercent(finalizeAt),
                                            maxDowntimeMilliseconds: maxDowntime, maxWaitSeconds: maxWait,
                                            maxPrecopyRatio: try FinalizePolicy.parseRatio(maxPrecopy))
            options.heuristic = try HeuristicName.make(heuristic)
            options.requestsInFlight = inFlight
            options.pagesPerRequest = batchPages
            options.verify = !noVerify && criuRestore == nil
            options.abortAtEnd = dryRun
            options.seederKey = try seederKey.map { try AuthOptions.publicKey($0) }
            options.maxFreezeAge = .milliseconds(Int64(maxFreezeAge * 1000))
            let (pacer, bandwidthControl) = try bandwidth.start(reporter)
            defer { bandwidthControl?.cancel() }
            options.pacer = pacer
            let peer = try PeerAddress(parsing: address)
            let connections = Connections(credentials: try auth.credentials(createDefault: false), compression: compression)
            let connect: Leecher.Connector = { try await connections.dial(peer) }
            let events: @Sendable (LeecherEvent) -> Void = { event in Self.report(event, reporter) }
            let leecher: Leecher
            var imageDirectory: String? = nil
            if let criuRestore {
                leecher = Leecher(connect: connect, restore: criuRestore, options: options, migration: migration, events: events)
            } else if let into {
                var live = LiveMemoryOptions()
                live.targetPid = into
                leecher = Leecher(connect: connect, memory: try LiveMemorySink(options: live), options: options,
                                  migration: migration, events: events)
            } else {
                let writer = try ImageWriter(directory: out)
                imageDirectory = writer.directory
                leecher = Leecher(connect: connect, sink: writer, options: options, migration: migration, events: events)
            }
            if let into, let sliceUs {
                setSchedulerSlice(.microseconds(sliceUs), threadsOf: getpid())
                if setSchedulerSlice(.microseconds(sliceUs), threadsOf: into) == 0 {
                    reporter.event("notice", ["message": .string("cannot set the scheduler slice of pid \(into)")],
                                   text: "leecher: cannot set the scheduler slice of pid \(into) (needs the right to change its scheduling, as root has); going on without it")
                }
            }
            defer { if let into, sliceUs != nil { setSchedulerSlice(nil, threadsOf: into) } }
            try criuRestore?.prepare() // issue 13: the socket CRIU's restore hands the process's memory over on
            let task = Task { try await leecher.run() }
            // SIGHUP too (a closed terminal or ssh session): an orderly end, in which
            // pages that never arrived are poisoned rather than lost.
            let caught = Atomic<Int32>(0)
            let signals = SignalWatcher([SIGINT, SIGTERM, SIGHUP]) { number in
                caught.store(number, ordering: .relaxed)
                task.cancel()
            }
            defer { signals.cancel() }
            let summary: LeecherSummary
            do {
                summary = try await task.value
            } catch let interrupted as MigrationInterrupted {
                throw Interrupted(signal: caught.load(ordering: .relaxed), source: interrupted.source)
            }
            if let criuRestore {
                try await criuRestore.waitEveryPage(timeout: .seconds(600))
            } else if let imageDirectory {
                reporter.event("image", ["directory": .string(imageDirectory),
                                         "regions": .int(Int64(summary.manifest.regions.count))],
                               text: "leecher: image written to \(imageDirectory) (\(summary.manifest.regions.count) regions)")
            } else if let into {
                let placed = summary.manifest.regions.filter { $0.file != nil }.count
                reporter.event("placed", ["pid": .int(Int64(into)), "regions": .int(Int64(placed))],
                               text: "leecher: memory placed into pid \(into) (\(placed) regions), checked against the frozen source")
            }
        }
    }

    static func report(_ event: LeecherEvent, _ reporter: Reporter) {
        switch event {
        case .connected(let peer, let pid, let host, let tracker, let regions, let pages):
            reporter.event("connected", ["peer": .string(peer), "pid": .int(Int64(pid)), "host": .string(host),
                                         "tracker": .string(tracker), "regions": .int(Int64(regions)),
                                         "pages": .int(Int64(pages))],
                           text: "leecher: migrating pid \(pid) on \(host) (\(peer)): \(regions) regions, \(pages) pages, tracker \(tracker)")
        case .progress(let p):
            let fraction = p.pagesTotal == 0 ? 1 : Double(p.pagesClean) / Double(p.pagesTotal)
            let mbps = p.bytesPerSecond / 1e6
            let eta = p.bytesPerSecond > 0 ? Double(p.pagesTotal - p.pagesClean) * 4096 / p.bytesPerSecond : .infinity
            reporter.progress(["phase": .string(p.phase), "pages_total": .int(Int64(p.pagesTotal)),
                               "pages_clean": .int(Int64(p.pagesClean)), "pages_dirty": .int(Int64(p.pagesDirty)),
                               "pages_remote": .int(Int64(p.pagesRemote)), "bytes": .int(Int64(p.bytesReceived)),
                               "mb_per_s": .double(mbps), "dirty_pages_per_s": .double(p.dirtyPagesPerSecond),
                               "eta_s": .double(eta)],
                              bar: "\(p.phase) \(progressBar(fraction)) \(p.pagesClean)/\(p.pagesTotal) pages  "
                                + String(format: "%.0f MB/s  %.0f dirty/s  ETA %.1f s", mbps, p.dirtyPagesPerSecond,
                                         eta.isFinite ? eta : 0))
        case .finalizing(let decision):
            let reason = decision.text(naming: optionName)
            reporter.event("finalizing", ["reason": .string(reason)], text: "leecher: finalizing: \(reason)")
        case .finalized(let downtime, let freeze, let dirty, let remote):
            reporter.event("finalized", ["downtime_ms": .double(downtime), "freeze_ms": .double(freeze),
                                         "dirty_pages": .int(Int64(dirty)), "remote_pages": .int(Int64(remote))],
                           text: String(format: "leecher: source frozen; downtime %.2f ms (freeze %.2f ms), %llu dirty pages, %d pages left for post-copy",
                                        downtime, freeze, dirty, remote))
        case .reconnecting(let attempt, let reason):
            reporter.event("reconnecting", ["attempt": .int(Int64(attempt)), "reason": .string(reason)],
                           text: "leecher: connection lost (\(reason)); reconnecting, attempt \(attempt)")
        case .resumed(let phase):
            reporter.event("resumed", ["phase": .string(phase)], text: "leecher: resumed the session (\(phase))")
        case .verifying(let pages):
            reporter.event("verifying", ["pages": .int(Int64(pages))],
                           text: "leecher: all \(pages) pages held; checking them against the frozen source")
        case .verified(let regions):
            reporter.event("verified", ["regions": .int(Int64(regions))],
                           text: "leecher: all \(regions) regions match the frozen source (BLAKE2b)")
        case .complete(let bytes, let seconds, let said):
            reporter.event("complete", ["bytes": .int(Int64(bytes)), "seconds": .double(seconds),
                                        "seeder": .string(said)],
                           text: String(format: "leecher: complete: %.1f MB in %.2f s; seeder: %@", Double(bytes) / 1e6, seconds, said))
        }
    }
}

/// The option that sets a finalize limit, as the reasons name it.
func optionName(_ limit: FinalizeReason.Limit) -> String {
    switch limit {
    case .maxWait: "--max-wait"
    case .cleanShare: "--finalize-at"
    case .maxDowntime: "--max-downtime"
    case .maxPrecopy: "--max-precopy"
    }
}

/// A pull ended by a signal: which one, and what became of the source.
struct Interrupted: Error, CustomStringConvertible {
    let signal: Int32
    let source: String

    var description: String {
        let name = switch signal {
        case SIGTERM: "SIGTERM"
        case SIGINT: "SIGINT"
        case SIGHUP: "SIGHUP"
        case 0: "cancellation"
        default: "signal \(signal)"
        }
        return "interrupted by \(name); \(source)"
    }
}
