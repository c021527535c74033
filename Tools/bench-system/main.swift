// ferry-bench-system: figures for the memory engine, each with its baseline
// measured in the same run (the machine is shared, so absolute numbers drift;
// ratios to a same-run baseline do not).
//
//   write  per-first-write cost of each tracker vs the same writer untracked
//   scan   dirty scan time over 1 GiB with 0 %, 1 %, 10 %, 100 % of pages written
//   read   page read throughput (PageReader and TrackedProcess.read) vs memcpy
//   zero   isAllZero (FerryToolkit) throughput
//
// Build and run in release mode:
//   swift build -c release --product ferry-bench-system && swift build -c release --product memwriter
//   sudo .build/release/ferry-bench-system [write] [scan] [read] [zero]
// The redis figure comes from Tools/bench-redis.sh.
import Dispatch
import FerrySystem
import FerryToolkit
import CFerryLinux
import FerryTestSupport
#if canImport(Glibc)
import Glibc
#endif

// MARK: - Output

func say(_ text: String) {
    var line = text
    line.append("\n")
    line.withUTF8 { bytes in _ = write(1, bytes.baseAddress, bytes.count) }
}

func fixed(_ value: Double, _ digits: Int) -> String {
    guard value.isFinite else { return "n/a" }
    var scale = 1.0
    for _ in 0..<digits { scale *= 10 }
    let negative = value < 0
    let scaled = (abs(value) * scale).rounded()
    let whole = UInt64(scaled / scale)
    let fraction = UInt64(scaled - Double(whole) * scale)
    var text = (negative ? "-" : "") + String(whole)
    if digits > 0 {
        let f = String(fraction)
        text += "." + String(repeating: "0", count: max(0, digits - f.count)) + f
    }
    return text
}

struct BenchError: Error, CustomStringConvertible {
    var description: String
    init(_ description: String) { self.description = description }
}

// MARK: - The memwriter child

extension Memwriter {
    /// The main region memwriter announced.
    var main: AddressRange { regions["main"] ?? AddressRange(start: 0, end: 0) }

    /// Sends `touch K` (every K-th page of main) and returns (pages, seconds).
    func touch(every step: Int) throws -> (Int, Double) {
        send(step == 1 ? "sweep" : "touch \(step)")
        let fields = try readLine(timeout: 300).split(separator: " ")
        guard fields.count == 3, let pages = Int(fields[1]), let ns = Double(fields[2]) else {
            throw BenchError("unexpected memwriter answer \(fields)")
        }
        return (pages, ns / 1e9)
    }
}

func pages(_ ranges: [AddressRange], within region: AddressRange) -> UInt64 {
    ranges.reduce(0) { total, r in
        let s = max(r.start, region.start), e = min(r.end, region.end)
        return s < e ? total + (e - s) / pageSize : total
    }
}

// MARK: - Benchmarks

/// Per-first-write cost: the writer touches N pages once each; untracked vs
/// every page write-protected (after startTracking or a scan that re-protected them).
func benchWrite() throws {
    say("== write: per-first-write cost, memwriter touching pages once each (4 KiB pages)")
    let rounds = 5
    for kind in TrackerKind.allCases {
        // Sync faults cost up to ~110 µs across cores: fewer pages keep the run short.
        let mib = kind == .sync ? 64 : 256
        let writer = try Memwriter(["--mib", "\(mib)", "--no-write"])
        var untracked: [Double] = []
        var count = 0
        for _ in 0..<rounds {
            let (n, t) = try writer.touch(every: 1)
            count = n
            untracked.append(t / Double(n))
        }
        let process: TrackedProcess
        do {
            process = try TrackedProcess.attach(pid: writer.pid, tracker: kind)
        } catch {
            say("[\(kind.rawValue)] unavailable: \(error)")
            continue
        }
        defer { try? process.detach() }
        try process.startTracking()
        var tracked: [Double] = []
        for _ in 0..<rounds {
            let (n, t) = try writer.touch(every: 1)
            tracked.append(t / Double(n))
            let dirty = try process.scanDirty() // re-protects every page for the next round
            let reported = pages(dirty, within: writer.main)
            if reported != UInt64(n) { say("[\(kind.rawValue)] warning: scan reported \(reported) of \(n) written pages") }
        }
        let base = median(untracked), with = median(tracked)
        let target = kind == .async ? " (target <= 1.5 µs)" : ""
        say("[\(kind.rawValue)] \(count) pages x \(rounds) rounds: untracked \(fixed(base * 1e9, 1)) ns/page, tracked \(fixed(with * 1e9, 1)) ns/page; extra per first write \(fixed((with - base) * 1e6, 3)) µs\(target); slowdown x\(fixed(with / base, 1))")
    }
}

/// Scan time over 1 GiB of 4 KiB pages at several dirty fractions.
func benchScan(mib: Int) throws {
    say("== scan: TrackedProcess.scanDirty over \(mib) MiB (async), median of 5")
    let writer = try Memwriter(["--mib", "\(mib)", "--no-write"])
    let process = try TrackedProcess.attach(pid: writer.pid, tracker: .async)
    defer { try? process.detach() }
    var t = now()
    try process.startTracking()
    say("[async] startTracking (register + write-protect \(mib) MiB): \(fixed((now() - t) * 1e3, 2)) ms")
    _ = try process.scanDirty()
    let total = Int(writer.main.pageCount)
    for (label, step) in [("0 %", 0), ("1 %", 100), ("10 %", 10), ("100 %", 1)] {
        var times: [Double] = []
        var reported: UInt64 = 0
        for _ in 0..<5 {
            if step > 0 { _ = try writer.touch(every: step) }
            t = now()
            let dirty = try process.scanDirty()
            times.append(now() - t)
            reported = pages(dirty, within: writer.main)
        }
        let expected = step == 0 ? 0 : (total + step - 1) / step
        let target = label == "1 %" ? " (target <= 1 ms)" : ""
        say("[async] scan \(label) dirty: \(fixed(median(times) * 1e3, 3)) ms\(target), \(reported) pages reported of \(expected) written")
    }
    // The raw maps read that refreshLayout adds to every finalize.
    var mapsTimes: [Double] = []
    for _ in 0..<20 {
        t = now()
        _ = try ProcessMaps.read(pid: writer.pid)
        mapsTimes.append(now() - t)
    }
    say("[maps] ProcessMaps.read of memwriter: \(fixed(median(mapsTimes) * 1e6, 1)) µs")
}

/// Read throughput against memcpy of the same size, same run.
func benchRead(mib: Int) throws {
    say("== read: \(mib) MiB from memwriter vs memcpy in this process, best of 3")
    let writer = try Memwriter(["--mib", "\(mib)", "--pattern", "--no-write"])
    let size = mib << 20
    let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: size, alignment: 4096)
    let source = UnsafeMutableRawBufferPointer.allocate(byteCount: size, alignment: 4096)
    defer { buffer.deallocate(); source.deallocate() }
    // Fault every page in first, so no run pays for page allocation.
    memset(buffer.baseAddress!, 1, size)
    memset(source.baseAddress!, 2, size)

    func best(_ body: () throws -> Void) rethrows -> Double {
        var times: [Double] = []
        for _ in 0..<3 {
            let t = now()
            try body()
            times.append(now() - t)
        }
        return times.min()!
    }
    let copy = best { memcpy(buffer.baseAddress!, source.baseAddress!, size) }
    let copyRate = Double(size) / copy / 1e9
    // Two threads copying a half each: the memory bandwidth two readers compete for.
    let sourceBits = UInt(bitPattern: source.baseAddress!), destinationBits = UInt(bitPattern: buffer.baseAddress!)
    let copy2 = best {
        DispatchQueue.concurrentPerform(iterations: 2) { half in
            // SAFETY: each thread copies its own half; both buffers outlive concurrentPerform.
            memcpy(UnsafeMutableRawPointer(bitPattern: destinationBits)! + half * size / 2,
                   UnsafeRawPointer(bitPattern: sourceBits)! + half * size / 2, size / 2)
        }
    }
    let copy2Rate = Double(size) / copy2 / 1e9
    // The same into freshly mapped memory: what a copy costs when the
    // destination pages are first touched (DESIGN.md's memcpy figure, one
    // buffer to a new one). The unmap is not timed.
    var coldTimes: [Double] = []
    for _ in 0..<3 {
        let t = now()
        let fresh = mmap(nil, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)!
        memcpy(fresh, source.baseAddress!, size)
        coldTimes.append(now() - t)
        munmap(fresh, size)
    }
    let coldRate = Double(size) / coldTimes.min()! / 1e9
    say("[memcpy] warm destination \(fixed(copyRate, 2)) GB/s (2 threads: \(fixed(copy2Rate, 2)) GB/s); "
        + "fresh destination (page faults) \(fixed(coldRate, 2)) GB/s")
    // The kernel's own limit: process_vm_readv of the whole region in 1 MiB
    // iovecs, 256 per call, into the warm buffer, with nothing of ours around it.
    let raw = best {
        var local = iovec(), remote = iovec()
        var offset = 0
        while offset < size {
            let n = min(256 << 20, size - offset)
            var locals: [iovec] = [], remotes: [iovec] = []
            for chunk in stride(from: 0, to: n, by: 1 << 20) {
                local = iovec(iov_base: buffer.baseAddress! + offset + chunk, iov_len: 1 << 20)
                remote = iovec(iov_base: UnsafeMutableRawPointer(bitPattern: UInt(writer.main.start) + UInt(offset + chunk)), iov_len: 1 << 20)
                locals.append(local); remotes.append(remote)
            }
            _ = ferry_process_vm_readv(writer.pid, locals, UInt(locals.count), remotes, UInt(remotes.count))
            offset += n
        }
    }
    let rawRate = Double(size) / raw / 1e9
    say("[process_vm_readv] raw, 1 MiB iovecs x256 per call: \(fixed(rawRate, 2)) GB/s\(verify(buffer, size))")
    // The other path: pread of /proc/PID/mem in 1 MiB calls. It copies
    // without pinning pages, so it never unshares copy-on-write pages
    // (issue 15); PageReader takes it for everything it can.
    let memFile = open("/proc/\(writer.pid)/mem", O_RDONLY | O_CLOEXEC)
    guard memFile >= 0 else { throw BenchError("open /proc/\(writer.pid)/mem: errno \(errno)") }
    defer { close(memFile) }
    let preadTime = best {
        for offset in stride(from: 0, to: size, by: 1 << 20) {
            _ = pread(memFile, buffer.baseAddress! + offset, 1 << 20, off_t(writer.main.start) + off_t(offset))
        }
    }
    let preadRate = Double(size) / preadTime / 1e9
    say("[/proc/PID/mem] raw pread, 1 MiB per call: \(fixed(preadRate, 2)) GB/s, "
        + "\(fixed(preadRate / rawRate * 100, 0)) % of raw process_vm_readv\(verify(buffer, size))")
    func ratios(_ rate: Double) -> String {
        "\(fixed(rate / copyRate * 100, 0)) % of warm memcpy, \(fixed(rate / coldRate * 100, 0)) % of fresh memcpy (target >= 70 %), "
            + "\(fixed(rate / rawRate * 100, 0)) % of raw process_vm_readv"
    }

    let reader = try PageReader(pid: writer.pid)
    let main = writer.main
    // 4 KiB ranges in the order 0, 2, 4, ... then 1, 3, 5, ...: no two
    // neighbours, so the reader cannot merge them into larger iovecs.
    let pageRanges = stride(from: main.start, to: main.end, by: 4096).map { AddressRange(start: $0, end: $0 + 4096) }
    let scattered = stride(from: 0, to: pageRanges.count, by: 2).map { pageRanges[$0] }
        + stride(from: 1, to: pageRanges.count, by: 2).map { pageRanges[$0] }
    let layouts: [(String, [AddressRange])] = [
        ("1 MiB ranges", stride(from: main.start, to: main.end, by: 1 << 20).map { AddressRange(start: $0, end: $0 + (1 << 20)) }),
        ("4 KiB ranges, adjacent", pageRanges),
        ("4 KiB ranges, none adjacent", scattered),
    ]
    for (label, ranges) in layouts {
        let time = try best { _ = try reader.read(ranges, into: buffer) }
        let rate = Double(size) / time / 1e9
        say("[PageReader] \(label): \(fixed(rate, 2)) GB/s, \(ratios(rate))")
    }
    // Two reader threads, each reading half in 1 MiB ranges: the seeder
    // serves many requests in flight, so readers run concurrently.
    let halves = [AddressRange(start: main.start, end: main.start + main.length / 2),
                  AddressRange(start: main.start + main.length / 2, end: main.end)]
    let bufferBits = UInt(bitPattern: buffer.baseAddress!)
    /// Seconds (best of 3) for `read` on two threads at once, each given
    /// half of the region in 1 MiB ranges and its own half of `buffer`.
    func twoReaders(_ read: @Sendable (_ ranges: [AddressRange], _ into: UnsafeMutableRawBufferPointer) throws -> Int) -> Double {
        best {
            DispatchQueue.concurrentPerform(iterations: 2) { half in
                let range = halves[half]
                let ranges = stride(from: range.start, to: range.end, by: 1 << 20).map { AddressRange(start: $0, end: $0 + (1 << 20)) }
                // SAFETY: each thread writes its own half of `buffer`, which
                // outlives concurrentPerform; the address travels as an integer
                // because raw buffer pointers are not Sendable.
                let part = UnsafeMutableRawBufferPointer(start: UnsafeMutableRawPointer(bitPattern: bufferBits)! + half * size / 2, count: size / 2)
                _ = try? read(ranges, part)
            }
        }
    }
    let parallel = twoReaders { try reader.read($0, into: $1) }
    let parallelRate = Double(size) / parallel / 1e9
    say("[PageReader] 2 threads, 1 MiB ranges: \(fixed(parallelRate, 2)) GB/s, \(ratios(parallelRate)), "
        + "\(fixed(parallelRate / copy2Rate * 100, 0)) % of 2-thread memcpy")
    // A target on transparent huge pages: fewer page-table steps per byte.
    do {
        let huge = try Memwriter(["--mib", "\(mib)", "--huge", "--pattern", "--no-write"])
        let hugeReader = try PageReader(pid: huge.pid)
        let ranges = stride(from: huge.main.start, to: huge.main.end, by: 1 << 20).map { AddressRange(start: $0, end: $0 + (1 << 20)) }
        let time = try best { _ = try hugeReader.read(ranges, into: buffer) }
        let rate = Double(size) / time / 1e9
        say("[PageReader] target on THP (--huge), 1 MiB ranges: \(fixed(rate, 2)) GB/s, \(ratios(rate))\(verify(buffer, size))")
    }
    // Through the facade: re-arm (write-protect) before copying, as the seeder serves pages.
    let process = try TrackedProcess.attach(pid: writer.pid)
    defer { try? process.detach() }
    try process.startTracking()
    for (label, chunk) in [("1 MiB ranges", 1 << 20), ("4 KiB ranges, 1024 per call", 4096)] {
        let all = stride(from: main.start, to: main.end, by: chunk).map { AddressRange(start: $0, end: $0 + UInt64(chunk)) }
        let perCall = chunk == 4096 ? 1024 : all.count
        let time = try best {
            var offset = 0
            var i = 0
            while i < all.count {
                let batch = Array(all[i..<min(i + perCall, all.count)])
                let part = UnsafeMutableRawBufferPointer(rebasing: buffer[offset...])
                offset += try process.read(batch, into: part)
                i += perCall
            }
        }
        let rate = Double(size) / time / 1e9
        say("[TrackedProcess.read, \(process.trackerKind.rawValue)] \(label): \(fixed(rate, 2)) GB/s, \(ratios(rate))")
    }
    // Two threads, as the seeder reads for two requests at once (its read lock is shared).
    let tracked2 = twoReaders { try process.read($0, into: $1) }
    let tracked2Rate = Double(size) / tracked2 / 1e9
    say("[TrackedProcess.read, \(process.trackerKind.rawValue)] 2 threads, 1 MiB ranges: \(fixed(tracked2Rate, 2)) GB/s, "
        + "\(ratios(tracked2Rate)), \(fixed(tracked2Rate / copy2Rate * 100, 0)) % of 2-thread memcpy")
    say("[read] last read checked against memwriter's pattern:\(verify(buffer, size))")
}

/// Checks sampled words of a read of a whole `--pattern` region (seed 1), so a
/// fast but wrong reader cannot pass.
func verify(_ buffer: UnsafeMutableRawBufferPointer, _ size: Int) -> String {
    let key: UInt64 = 0x9E37_79B9_7F4A_7C15 &* 2
    var wrong = 0, checked = 0
    for offset in stride(from: 0, to: size, by: 4096 * 7 + 8) {
        checked += 1
        if buffer.load(fromByteOffset: offset, as: UInt64.self) != UInt64(offset) ^ key { wrong += 1 }
    }
    return wrong == 0 ? " (\(checked) sampled words correct)" : " ERROR: \(wrong) of \(checked) sampled words differ"
}

func benchZero() {
    let size = 256 << 20
    let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: size, alignment: 4096)
    defer { buffer.deallocate() }
    memset(buffer.baseAddress!, 0, size)
    var best = Double.infinity
    var zeros = 0
    for _ in 0..<3 {
        let t = now()
        zeros = 0
        for page in stride(from: 0, to: size, by: 4096) where isAllZero(UnsafeRawBufferPointer(rebasing: buffer[page..<page + 4096])) {
            zeros += 1
        }
        best = min(best, now() - t)
    }
    say("== zero: isAllZero over 256 MiB of zero pages: \(fixed(Double(size) / best / 1e9, 2)) GB/s (\(zeros) pages)")
}

// MARK: - Main

var selected = Set(CommandLine.arguments.dropFirst())
if selected.contains("--help") || selected.contains("-h") {
    say("usage: ferry-bench-system [write] [scan] [read] [zero]   (all when none given; run as root, release build)")
    exit(0)
}
if selected.isEmpty { selected = ["write", "scan", "read", "zero"] }
let scanMiB = Int(String(cString: getenv("FERRY_BENCH_SCAN_MIB") ?? strdup("1024"))) ?? 1024
let readMiB = Int(String(cString: getenv("FERRY_BENCH_READ_MIB") ?? strdup("512"))) ?? 512
do {
    if selected.contains("write") { try benchWrite() }
    if selected.contains("scan") { try benchScan(mib: scanMiB) }
    if selected.contains("read") { try benchRead(mib: readMiB) }
    if selected.contains("zero") { benchZero() }
} catch {
    var text = "ferry-bench-system: \(error)\n"
    text.withUTF8 { _ = write(2, $0.baseAddress, $0.count) }
    exit(1)
}
