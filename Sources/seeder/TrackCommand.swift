// `seeder track <pid>`: attach, write-protect every migratable region, and
// print how many pages the process dirties per second (CRIU's per-second
// statistics), then detach and leave the process running as before.
// For people sizing a migration and for tests of the memory engine.
import ArgumentParser
import FerryCLI
import FerryMigration
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

extension TrackerKind: ExpressibleByArgument {}

/// When a written page is write-protected again.
enum RearmMode: String, ExpressibleByArgument, CaseIterable {
    /// At every scan: each interval counts the pages written in it.
    case scan
    /// Only when the page is read, as `seeder serve` does.
    case read
}

/// Set by SIGINT/SIGTERM: stop at the next tick and detach cleanly.
private let interrupted = Atomic<Bool>(false)

struct TrackCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "track",
        abstract: "Track a process's writes and print dirty pages per second.",
        discussion: """
            Attaches to the process, lists its memory regions (migrate, record, skip), \
            write-protects the migrate regions and rescans them every --interval \
            milliseconds, printing the pages dirtied in each second. Then detaches: \
            the process runs on unaffected. Ctrl-C ends early and still detaches.

            --rearm scan (the default) protects every reported page again at each \
            scan, so each second counts the pages written in it; the process pays \
            one write fault per page it dirties again, per scan. --rearm read \
            protects a page again only when it is read, which is what `seeder serve` \
            does while migrating (rescanning is then free for the process); here \
            nothing is read, so the count is the distinct pages written since \
            tracking began, and the first report of each page.
            """
    )

    @Argument(help: "The pid of the process to track.")
    var pid: Int32

    @Option(help: "Tracker: \(TrackerKind.allCases.map(\.rawValue).joined(separator: ", ")) (default: the best this kernel offers).")
    var tracker: TrackerKind?

    @Option(help: "How long to track, in seconds (0 = until interrupted).")
    var seconds: Double = 5

    @Option(help: "Milliseconds between dirty scans.")
    var interval: Int = 1000

    @Option(help: "When a written page is protected again: scan (exact per-second counts) or read (as `seeder serve` migrates).")
    var rearm: RearmMode = .scan

    @Flag(help: "Print one JSON event per line instead of text.")
    var json = false

    func validate() throws {
        guard pid > 0 else { throw ValidationError("<pid> must be a positive process id, not \(pid)") }
        guard seconds >= 0, seconds.isFinite else { throw ValidationError("--seconds must be 0 or more") }
        guard (1...60_000).contains(interval) else { throw ValidationError("--interval must be 1 to 60000 milliseconds") }
    }

    func run() throws {
        do {
            try track()
        } catch {
            writeLine("seeder: \(error)", to: 2)
            throw ExitCode.failure
        }
    }

    private func track() throws {
        // Before attaching: Ctrl-C while the process is frozen for the
        // remote syscall must not kill us half-way; the loop sees the flag.
        for signal in [SIGINT, SIGTERM] {
            _ = Glibc.signal(signal) { _ in interrupted.store(true, ordering: .relaxed) }
        }
        let process = try TrackedProcess.attach(pid: pid, tracker: tracker)
        var detached = false
        defer { if !detached { try? process.detach() } }

        try process.startTracking()
        let output = Output(json: json)
        output.attached(pid: pid, tracker: process.trackerKind, rearm: rearm, regions: process.regions, unprotectable: process.unprotectable)

        let clock = ContinuousClock()
        let start = clock.now
        let end: ContinuousClock.Instant? = seconds > 0 ? start + .milliseconds(Int64(seconds * 1000)) : nil
        let tick = Duration.milliseconds(interval)
        let report = max(tick, .seconds(1)) // print at most once a second
        var nextScan = start + tick
        var nextReport = start + report
        var lastReport = start
        var bucket = Bucket()
        var total = Bucket()
        let unprotected = Ranges.merge(process.unprotectable.map(\.range))
        var seen: [AddressRange] = []

        while !interrupted.load(ordering: .relaxed) {
            var now = clock.now
            if let end, now >= end { break }
            let wake = min(nextScan, end ?? nextScan)
            while now < wake && !interrupted.load(ordering: .relaxed) {
                let left = wake - now
                let step = min(left, .milliseconds(50))
                usleep(UInt32(clamping: max(1, step.wholeMicroseconds)))
                now = clock.now
            }
            if interrupted.load(ordering: .relaxed) { break }

            let scanStart = clock.now
            let change = try process.refreshLayout()
            var dirty = try process.scanDirty(rearm: rearm == .scan)
            let scanTime = clock.now - scanStart
            if rearm == .read {
                // Pages stay reported until read: count each once, when first seen.
                let fresh = Ranges.subtract(dirty, seen)
                seen = Ranges.merge(seen + fresh)
                dirty = fresh
            }
            let pages = pageCount(dirty) - pageCount(Ranges.intersect(dirty, unprotected))
            bucket.add(pages: pages, newPages: change.newlyDirtyPages, scan: scanTime, regionsAdded: change.added.count, regionsRemoved: change.removed.count)
            nextScan += tick
            if nextScan < clock.now { nextScan = clock.now + tick } // do not burst after a stall

            if clock.now >= nextReport || (end.map { clock.now >= $0 } ?? false) {
                let now = clock.now
                output.interval(elapsed: now - start, bucket: bucket, length: now - lastReport)
                lastReport = now
                total.merge(bucket)
                bucket = Bucket()
                nextReport += report
            }
        }
        if bucket.scans > 0 {
            total.merge(bucket)
        }
        let elapsed = clock.now - start
        detached = true
        try process.detach()
        output.detached(pid: pid, elapsed: elapsed, total: total, interrupted: interrupted.load(ordering: .relaxed))
    }
}

/// Totals over one reporting period.
private struct Bucket {
    var scans = 0
    var pages: UInt64 = 0
    var newPages: UInt64 = 0
    var scanTime = Duration.zero
    var maxScan = Duration.zero
    var regionsAdded = 0
    var regionsRemoved = 0

    mutating func add(pages: UInt64, newPages: UInt64, scan: Duration, regionsAdded: Int, regionsRemoved: Int) {
        scans += 1
        self.pages += pages
        self.newPages += newPages
        scanTime += scan
        maxScan = max(maxScan, scan)
        self.regionsAdded += regionsAdded
        self.regionsRemoved += regionsRemoved
    }

    mutating func merge(_ other: Bucket) {
        scans += other.scans
        pages += other.pages
        newPages += other.newPages
        scanTime += other.scanTime
        maxScan = max(maxScan, other.maxScan)
        regionsAdded += other.regionsAdded
        regionsRemoved += other.regionsRemoved
    }

    var meanScan: Duration { scans > 0 ? scanTime / scans : .zero }
}

/// Text for people or one JSON event per line for scripts.
private struct Output {
    let json: Bool

    func attached(pid: Int32, tracker: TrackerKind, rearm: RearmMode, regions: [Region], unprotectable: [Region]) {
        if json {
            emit(["event": .string("attached"), "pid": .int(Int64(pid)), "tracker": .string(tracker.rawValue)])
            for region in regions {
                emit(["event": .string("region"), "start": .uint(UInt64(region.start)), "end": .uint(UInt64(region.end)),
                      "permissions": .string(region.permissions), "offset": .uint(UInt64(region.offset)),
                      "name": .string(region.name), "kind": .string(region.kind.rawValue),
                      "unprotectable": .bool(unprotectable.contains(region))])
            }
            emit(["event": .string("tracking"), "rearm": .string(rearm.rawValue), "migratePages": .uint(UInt64(pages(regions, .migrate))),
                  "unprotectablePages": .uint(UInt64(unprotectable.reduce(0) { $0 + $1.range.pageCount }))])
            return
        }
        writeLine("pid \(pid): tracker \(tracker.rawValue) (\(describe(tracker)))")
        let counts = Dictionary(grouping: regions, by: \.kind).mapValues(\.count)
        writeLine("regions: \(regions.count) (migrate \(counts[.migrate] ?? 0), record \(counts[.recordOnly] ?? 0), skip \(counts[.skip] ?? 0)); migrate \(mib(pages(regions, .migrate))) in \(pages(regions, .migrate)) pages")
        for region in regions {
            let kind = region.kind == .recordOnly ? "record" : region.kind.rawValue
            let flag = unprotectable.contains(region) ? "  (unprotectable: sent in full)" : ""
            let offset = region.inode != 0 ? " @0x" + String(region.offset, radix: 16) : ""
            writeLine("  \(pad(kind, 7)) \(pad(region.range.description, 29)) \(region.permissions) \(pad(mib(region.range.pageCount), 10)) \(region.name)\(offset)\(flag)")
        }
        if unprotectable.isEmpty {
            writeLine("unprotectable: none")
        } else {
            writeLine("unprotectable: \(unprotectable.count) regions, \(mib(unprotectable.reduce(0) { $0 + $1.range.pageCount })) (not counted below)")
        }
        switch rearm {
        case .scan: writeLine("rearm on scan: each second counts the pages written in it")
        case .read: writeLine("rearm on read (as seeder serve): each page counts once, when first written; nothing is read here")
        }
        writeLine("\(pad("time", 8)) \(pad("dirty pages/s", 14)) \(pad("MiB/s", 9)) \(pad("new pages", 10)) \(pad("scans", 6)) scan ms (mean/max)")
    }

    func interval(elapsed: Duration, bucket: Bucket, length: Duration) {
        let rate = Double(bucket.pages) / length.inSeconds
        if json {
            emit(["event": .string("interval"), "elapsed": .double(elapsed.inSeconds), "dirtyPages": .int(Int64(bucket.pages)),
                  "pagesPerSecond": .double(rate.rounded()), "newPages": .int(Int64(bucket.newPages)), "scans": .int(Int64(bucket.scans)),
                  "scanMeanMs": .double(ms(bucket.meanScan)), "scanMaxMs": .double(ms(bucket.maxScan)),
                  "regionsAdded": .int(Int64(bucket.regionsAdded)), "regionsRemoved": .int(Int64(bucket.regionsRemoved))])
            return
        }
        writeLine("\(pad(fixed(elapsed.inSeconds, 1) + " s", 8)) \(pad(String(Int(rate.rounded())), 14)) \(pad(fixed(rate * 4096 / 1048576, 1), 9)) \(pad(String(bucket.newPages), 10)) \(pad(String(bucket.scans), 6)) \(fixed(ms(bucket.meanScan), 3))/\(fixed(ms(bucket.maxScan), 3))")
    }

    func detached(pid: Int32, elapsed: Duration, total: Bucket, interrupted: Bool) {
        if json {
            emit(["event": .string("detached"), "pid": .int(Int64(pid)), "elapsed": .double(elapsed.inSeconds),
                  "dirtyPages": .uint(UInt64(total.pages)), "scans": .uint(UInt64(total.scans)), "interrupted": .bool(interrupted)])
            return
        }
        writeLine("detached from pid \(pid) after \(fixed(elapsed.inSeconds, 1)) s\(interrupted ? " (interrupted)" : ""): \(total.pages) dirty pages in \(total.scans) scans")
    }

    private func describe(_ kind: TrackerKind) -> String {
        switch kind {
        case .async: return "userfaultfd WP_ASYNC + PAGEMAP_SCAN"
        case .sync: return "userfaultfd write-protect with a fault handler thread"
        case .softDirty: return "soft-dirty bits"
        }
    }

    private func pages(_ regions: [Region], _ kind: RegionKind) -> UInt64 {
        regions.filter { $0.kind == kind }.reduce(0) { $0 + $1.range.pageCount }
    }

    private func emit(_ fields: KeyValuePairs<String, JSONField>) {
        writeLine("{" + fields.map { "\(JSONField.quote($0.key)):\($0.value.encoded)" }.joined(separator: ",") + "}")
    }
}

private func ms(_ d: Duration) -> Double { (d.inSeconds * 1e6).rounded() / 1e3 }

private func fixed(_ value: Double, _ digits: Int) -> String {
    var scale = 1.0
    for _ in 0..<digits { scale *= 10 }
    let rounded = (value * scale).rounded() / scale
    var text = String(rounded)
    if let dot = text.firstIndex(of: ".") {
        let decimals = text.distance(from: dot, to: text.endIndex) - 1
        if decimals < digits { text += String(repeating: "0", count: digits - decimals) }
    } else if digits > 0 {
        text += "." + String(repeating: "0", count: digits)
    }
    return text
}

private func mib(_ pages: UInt64) -> String { fixed(Double(pages) * 4096 / 1048576, 1) + " MiB" }

private func pad(_ s: String, _ width: Int) -> String {
    s.count >= width ? s : s + String(repeating: " ", count: width - s.count)
}

private func pageCount(_ ranges: [AddressRange]) -> UInt64 { ranges.reduce(0) { $0 + $1.pageCount } }

/// Writes a whole line to a descriptor (1 = stdout, 2 = stderr) at once, so
/// lines reach pipes immediately and never interleave half-written.
func writeLine(_ text: String, to fd: Int32 = 1) {
    var line = text
    line.append("\n")
    line.withUTF8 { bytes in
        guard let base = bytes.baseAddress else { return }
        var done = 0
        while done < bytes.count {
            // A failed write (a closed pipe) drops the line: there is no one left to tell.
            guard let n = try? checkedCall("write", on: "descriptor \(fd)", { write(fd, base + done, bytes.count - done) }),
                  n > 0 else { return }
            done += n
        }
    }
}
