// Figures for the report, not pass/fail gates: run with FERRY_BENCH=1.
// Per-first-write cost of each tracker against the untracked writer, dirty
// scan time over 1 GiB, and read throughput against memcpy, in one run.
import Testing
import Glibc
@testable import FerrySystem

/// `value` with `digits` decimals (no Foundation here).
private func fixed(_ value: Double, _ digits: Int) -> String {
    var scale = 1.0
    for _ in 0..<digits { scale *= 10 }
    let scaled = (value * scale).rounded()
    let whole = Int(scaled / scale)
    let fraction = Int(abs(scaled) - abs(Double(whole)) * scale)
    if digits == 0 { return String(whole) }
    let text = String(fraction)
    return "\(scaled < 0 && whole == 0 ? "-" : "")\(whole)." + String(repeating: "0", count: max(0, digits - text.count)) + text
}

private let benchEnabled = getenv("FERRY_BENCH") != nil

@Suite(.serialized, .enabled(if: benchEnabled, "set FERRY_BENCH=1 to run the tracker benchmarks"))
struct TrackerBenchmarks {
    private func seconds(_ duration: Duration) -> Double {
        Double(duration.components.seconds) + Double(duration.components.attoseconds) / 1e18
    }

    @Test(arguments: [TrackerKind.async, .sync])
    func firstWriteCost(kind: TrackerKind) throws {
        let pages = 65_536 // 256 MiB
        let child = try TestChild(pages: pages)
        try child.process.call("fill")
        let untracked = Double(try child.process.call("time \(pages)")[0])!
        let process = try TrackedProcess.attach(pid: child.pid, tracker: kind)
        defer { try? process.detach() }
        try process.startTracking()
        let tracked = Double(try child.process.call("time \(pages)", timeout: 60)[0])!
        let perWrite = (tracked - untracked) / Double(pages)
        let untrackedPerPage = untracked / Double(pages)
        let trackedPerPage = tracked / Double(pages)
        print("[\(kind.rawValue)] first write to a protected page: \(fixed(perWrite / 1000, 2)) µs extra (untracked \(fixed(untrackedPerPage, 1)) ns/page, tracked \(fixed(trackedPerPage, 1)) ns/page, ratio \(fixed(tracked / untracked, 1)))")
    }

    @Test func scanAndReadOneGiB() throws {
        let pages = 262_144 // 1 GiB
        let child = try TestChild(pages: pages)
        try child.process.call("fill", timeout: 60)
        let process = try TrackedProcess.attach(pid: child.pid, tracker: .async)
        defer { try? process.detach() }
        let clock = ContinuousClock()
        var started = clock.now
        try process.startTracking()
        print("[async] startTracking (register + write-protect 1 GiB, 4 KiB pages): \(clock.now - started)")
        _ = try process.scanDirty()
        for (label, count) in [("0 %", 0), ("1 %", pages / 100), ("10 %", pages / 10)] {
            if count > 0 { _ = try child.writeRandom(seed: 3, count: count, threads: 1) }
            started = clock.now
            let dirty = try process.scanDirty()
            let elapsed = clock.now - started
            let dirtyPages = Ranges.intersect(dirty, [child.region]).reduce(0) { $0 + $1.pageCount }
            print("[async] scanDirty of 1 GiB, \(label) written (\(dirtyPages) pages reported): \(elapsed)")
        }
        try child.process.call("fill", timeout: 60)
        started = clock.now
        _ = try process.scanDirty()
        print("[async] scanDirty of 1 GiB, 100 % written: \(clock.now - started)")

        // Read throughput: 1 MiB ranges, against memcpy of the same size here.
        let size = pages * Int(pageSize)
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: size, alignment: 4096)
        defer { buffer.deallocate() }
        memset(buffer.baseAddress!, 1, size)
        let ranges = stride(from: child.base, to: child.base + UInt64(size), by: 1 << 20).map {
            AddressRange(start: $0, end: $0 + (1 << 20))
        }
        started = clock.now
        let bytes = try process.read(ranges, into: buffer)
        let readTime = seconds(clock.now - started)
        let source = UnsafeMutableRawBufferPointer.allocate(byteCount: size, alignment: 4096)
        defer { source.deallocate() }
        memset(source.baseAddress!, 2, size)
        started = clock.now
        memcpy(buffer.baseAddress!, source.baseAddress!, size)
        let copyTime = seconds(clock.now - started)
        let readRate = Double(bytes) / readTime / 1e9
        let copyRate = Double(size) / copyTime / 1e9
        print("[async] read 1 GiB in 1 MiB ranges (re-arm + process_vm_readv): \(fixed(readRate, 2)) GB/s; memcpy \(fixed(copyRate, 2)) GB/s; ratio \(fixed(readRate / copyRate, 2))")
    }
}
