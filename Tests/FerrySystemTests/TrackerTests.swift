// Write tracking on a live child: every written page is reported, pages never
// written are not, reads re-arm, races lose nothing, layout changes count dirty.
import Testing
import FerryTestSupport
import Glibc
import Synchronization
@testable import FerrySystem

/// Page indices of `child`'s region inside `ranges`.
private func pages(of child: TestChild, in ranges: [AddressRange]) -> Set<Int> {
    var result = Set<Int>()
    for range in Ranges.intersect(Ranges.merge(ranges), [child.region]) {
        var address = range.start
        while address < range.end {
            result.insert(Int((address - child.base) / pageSize))
            address += pageSize
        }
    }
    return result
}

private let uffdTrackers: [TrackerKind] = [.async, .sync]

@Suite(.serialized)
struct TrackerTests {
    @Test(arguments: uffdTrackers)
    func everyWrittenPageIsReportedAndNoOther(kind: TrackerKind) throws {
        let child = try TestChild(pages: 1024)
        let process = try TrackedProcess.attach(pid: child.pid, tracker: kind)
        defer { try? process.detach() }
        #expect(process.trackerKind == kind)
        try process.startTracking()
        #expect(pages(of: child, in: try process.scanDirty()).isEmpty, "nothing written yet")
        // Property over many seeds: random pages, 4 writer threads at once.
        for seed in UInt64(1)...24 {
            let written = try child.writeRandom(seed: seed, count: 64, threads: 4)
            let reported = pages(of: child, in: try process.scanDirty())
            #expect(written.isSubset(of: reported), "seed \(seed): missed \(written.subtracting(reported).sorted())")
            #expect(reported.isSubset(of: written), "seed \(seed): never written \(reported.subtracting(written).sorted())")
        }
        #expect(pages(of: child, in: try process.scanDirty()).isEmpty, "a scan re-protects what it reports")
    }

    /// The seeder's way: scans leave written pages writable, so a page
    /// rewritten between scans costs no fault; reading it re-arms it.
    @Test(arguments: uffdTrackers)
    func scansWithoutRearmLeavePagesWatchedFromTheirNextRead(kind: TrackerKind) throws {
        let child = try TestChild(pages: 64)
        let process = try TrackedProcess.attach(pid: child.pid, tracker: kind)
        defer { try? process.detach() }
        try process.startTracking()
        try child.set(5, 55)
        try child.set(9, 99)
        #expect(pages(of: child, in: try process.scanDirty(rearm: false)) == [5, 9])
        // Still reported (async) or reported once (sync), never lost: the
        // pages are not protected again, so a second write costs no fault.
        let again = pages(of: child, in: try process.scanDirty(rearm: false))
        #expect(kind == .async ? again == [5, 9] : again.isEmpty)
        try child.set(5, 56)
        var buffer = [UInt8](repeating: 0, count: Int(pageSize))
        _ = try buffer.withUnsafeMutableBytes { try process.read([child.page(5)], into: $0) }
        #expect(buffer.withUnsafeBytes { $0.load(as: UInt64.self) } == 56, "the read holds every write before it")
        let afterRead = pages(of: child, in: try process.scanDirty(rearm: false))
        #expect(!afterRead.contains(5), "page 5 was re-armed by its read and not written since")
        // A write after the read is reported.
        try child.set(5, 57)
        #expect(pages(of: child, in: try process.scanDirty(rearm: true)).contains(5), "a write after the read is reported")
        #expect(!pages(of: child, in: try process.scanDirty(rearm: true)).contains(5), "and then watches it again")
    }

    @Test(arguments: uffdTrackers)
    func readingAPageRearmsIt(kind: TrackerKind) throws {
        let child = try TestChild(pages: 64)
        let process = try TrackedProcess.attach(pid: child.pid, tracker: kind)
        defer { try? process.detach() }
        try process.startTracking()
        try child.set(3, 33)
        try child.set(40, 44) // in the never-touched half
        var buffer = [UInt8](repeating: 0, count: Int(pageSize))
        let read = try buffer.withUnsafeMutableBytes { try process.read([child.page(3)], into: $0) }
        #expect(read == Int(pageSize))
        #expect(buffer.withUnsafeBytes { $0.load(as: UInt64.self) } == 33)
        #expect(pages(of: child, in: try process.scanDirty()) == [40], "page 3 was sent after its write")
        // A partial read sends nothing: the page stays dirty.
        try child.set(6, 66)
        var word: UInt64 = 0
        _ = try withUnsafeMutableBytes(of: &word) { try process.read([AddressRange(start: child.page(6).start, end: child.page(6).start + 8)], into: $0) }
        #expect(word == 66)
        #expect(pages(of: child, in: try process.scanDirty()) == [6])
        // readReporting re-arms too, and says which ranges are gone instead of failing.
        try child.set(5, 55)
        let reported = try buffer.withUnsafeMutableBytes { try process.readReporting([child.page(5)], into: $0) }
        #expect(reported.bytes == Int(pageSize) && reported.vanished.isEmpty)
        #expect(buffer.withUnsafeBytes { $0.load(as: UInt64.self) } == 55)
        #expect(pages(of: child, in: try process.scanDirty()).isEmpty)
        try child.set(3, 34)
        #expect(pages(of: child, in: try process.scanDirty()) == [3], "a write after the read is seen")
        // Reading never-written pages does not make them dirty (async), or
        // once only (sync: our read of an empty page is a missing fault, which
        // it must count, see SyncWPTracker.swift).
        var big = [UInt8](repeating: 0, count: 64 * Int(pageSize))
        _ = try big.withUnsafeMutableBytes { try process.read([child.region], into: $0) }
        let afterRead = pages(of: child, in: try process.scanDirty())
        if kind == .async {
            #expect(afterRead.isEmpty)
        } else {
            #expect(afterRead.allSatisfy { $0 >= 32 && $0 != 40 }, "only never-touched pages")
        }
        _ = try big.withUnsafeMutableBytes { try process.read([child.region], into: $0) }
        #expect(pages(of: child, in: try process.scanDirty()).isEmpty)
    }

    @Test(arguments: uffdTrackers)
    func aWriteRacingAReadIsNeverLost(kind: TrackerKind) throws {
        let child = try TestChild(pages: 16)
        let process = try TrackedProcess.attach(pid: child.pid, tracker: kind)
        defer { try? process.detach() }
        try process.startTracking()
        // The "leecher": keeps a copy of page 5, refreshed when a scan says so
        // and, at random, regardless (reads re-arm before copying).
        var copy: UInt64 = 0
        var buffer = [UInt8](repeating: 0, count: Int(pageSize))
        func refresh() throws {
            _ = try buffer.withUnsafeMutableBytes { try process.read([child.page(5)], into: $0) }
            copy = buffer.withUnsafeBytes { $0.load(as: UInt64.self) }
        }
        let total: UInt64 = kind == .async ? 200_000 : 20_000
        child.process.send("race 5 \(total)")
        var rounds = 0
        var generator = SystemRandomNumberGenerator()
        while true {
            rounds += 1
            if pages(of: child, in: try process.scanDirty()).contains(5) || Bool.random(using: &generator) {
                try refresh()
            }
            if rounds % 16 == 0, let line = try? child.process.readLine(timeout: 0.001) {
                #expect(line == "ok \(total)")
                break
            }
        }
        if pages(of: child, in: try process.scanDirty()).contains(5) { try refresh() }
        #expect(copy == total, "the copy holds the last write after \(rounds) rounds")
    }

    /// A mapping replaced while a scan finds its address empty, then put back
    /// at the same address before the next layout refresh: the refresh sees
    /// "no change", yet nothing tracks it. It must count dirty in full and be
    /// tracked again (found by a 256 MiB migration under mmap churn).
    @Test(arguments: uffdTrackers)
    func aMappingReplacedAcrossAScanIsTrackedAgain(kind: TrackerKind) throws {
        let child = try TestChild(pages: 64)
        let process = try TrackedProcess.attach(pid: child.pid, tracker: kind)
        defer { try? process.detach() }
        try process.startTracking()
        let fresh = UInt64(try child.process.call("mmap 8 0")[0], radix: 16)!
        _ = try process.refreshLayout()
        _ = try process.scanDirty()
        try child.process.call("munmap \(fresh) 8")
        _ = try process.scanDirty()
        let again = UInt64(try child.process.call("mmap 8 0")[0], radix: 16)!
        try #require(again == fresh, "the kernel did not reuse the address; the case cannot be set up")
        _ = try process.refreshLayout()
        let dirty = try process.scanDirty()
        #expect(dirty.contains { $0.contains(again) && $0.contains(again + 8 * pageSize - 1) }, "\(dirty)")
        _ = try process.scanDirty()
        try child.process.call("wat \(again + pageSize) 5")
        #expect(try process.scanDirty().contains { $0.contains(again + pageSize) })
    }

    /// A read whose range starts in a mapping replaced since it was
    /// registered: the kernel's re-protect stops at that mapping with ENOENT,
    /// and the registered mapping after it must still be re-armed, or a write
    /// to it after the copy raises no fault and is never seen (the sync
    /// tracker's "rare miss under mmap churn": a malloc arena right after a
    /// churned mapping lost its hottest page).
    @Test(arguments: uffdTrackers)
    func aReadAcrossAReplacedMappingStillRearmsTheRest(kind: TrackerKind) throws {
        let child = try TestChild(pages: 64)
        let mapping = UInt64(try child.process.call("mmap 16 0")[0], radix: 16)!
        let process = try TrackedProcess.attach(pid: child.pid, tracker: kind)
        defer { try? process.detach() }
        try process.startTracking()
        // Page 12 written after tracking began: its fault unprotects it.
        try child.process.call("wat \(mapping + 12 * pageSize) 1")
        #expect(try process.scanDirty(rearm: false).contains { $0.contains(mapping + 12 * pageSize) })
        // The first half replaced by an unregistered mapping at the same address.
        try child.process.call("munmap \(mapping) 8")
        try child.process.call("mmapat \(mapping) 8")
        // The seeder sends the whole range: re-arm, then copy.
        var buffer = [UInt8](repeating: 0, count: Int(16 * pageSize))
        _ = try buffer.withUnsafeMutableBytes { try process.readReporting([AddressRange(start: mapping, end: mapping + 16 * pageSize)], into: $0) }
        #expect(buffer.withUnsafeBytes { $0.load(fromByteOffset: Int(12 * pageSize), as: UInt64.self) } == 1)
        _ = try process.scanDirty(rearm: false)
        // A write after the copy must be reported.
        try child.process.call("wat \(mapping + 12 * pageSize) 2")
        #expect(try process.scanDirty(rearm: false).contains { $0.contains(mapping + 12 * pageSize) }, "the write after the copy was missed")
    }

    @Test(arguments: uffdTrackers)
    func layoutChangesCountDirtyAndAreTrackedAfterwards(kind: TrackerKind) throws {
        let child = try TestChild(pages: 64)
        let process = try TrackedProcess.attach(pid: child.pid, tracker: kind)
        defer { try? process.detach() }
        try process.startTracking()
        _ = try process.scanDirty()

        // A new private and a new shared anonymous region, and heap growth.
        let fresh = UInt64(try child.process.call("mmap 8 0")[0], radix: 16)!
        let shared = UInt64(try child.process.call("mmap 8 1")[0], radix: 16)!
        let heap = UInt64(try child.process.call("grow 4")[0], radix: 16)!
        let change = try process.refreshLayout()
        #expect(change.newlyDirty.contains { $0.contains(fresh) && $0.contains(fresh + 8 * pageSize - 1) })
        #expect(change.newlyDirty.contains { $0.contains(shared) })
        #expect(change.newlyDirty.contains { $0.contains(heap) })
        let first = try process.scanDirty()
        #expect(first.contains { $0.contains(fresh) && $0.contains(fresh + 7 * pageSize) }, "new parts are dirty in full")
        #expect(first.contains { $0.contains(shared) })
        #expect(process.unprotectable.allSatisfy { !$0.range.contains(fresh) })

        // Registered from now on: one write each is seen, nothing else.
        #expect(!(try process.scanDirty()).contains { $0.contains(fresh) || $0.contains(shared) })
        try child.process.call("wat \(fresh + 3 * pageSize) 1")
        try child.process.call("wat \(shared + 2 * pageSize) 1")
        let second = try process.scanDirty()
        #expect(second.contains { $0.contains(fresh + 3 * pageSize) })
        #expect(!second.contains { $0.contains(fresh + 4 * pageSize) })
        #expect(second.contains { $0.contains(shared + 2 * pageSize) })

        // MADV_DONTNEED followed by writes.
        try child.process.call("zap 0 16")
        try child.set(2, 22)
        try child.set(20, 20) // never written before, in the untouched half
        #expect(pages(of: child, in: try process.scanDirty()).isSuperset(of: [2]))

        // Unmapped and mapped again (often at the same address): still tracked.
        try child.process.call("munmap \(fresh) 8")
        let again = UInt64(try child.process.call("mmap 8 0")[0], radix: 16)!
        _ = try process.refreshLayout()
        _ = try process.scanDirty()
        try child.process.call("wat \(again + pageSize) 5")
        #expect(try process.scanDirty().contains { $0.contains(again + pageSize) })
    }

    @Test(.enabled(if: SoftDirtyTracker.kernelSupportsSoftDirty(),
                   "this kernel is built without CONFIG_MEM_SOFT_DIRTY: the soft-dirty tracker cannot run here"))
    func softDirtyReportsWrittenPages() throws {
        let child = try TestChild(pages: 256)
        let process = try TrackedProcess.attach(pid: child.pid, tracker: .softDirty)
        defer { try? process.detach() }
        try process.startTracking()
        _ = try process.scanDirty()
        let written = try child.writeRandom(seed: 7, count: 32, threads: 2)
        #expect(written.isSubset(of: pages(of: child, in: try process.scanDirty())))
    }

    @Test func scanOfManyScatteredRangesIsComplete() throws {
        // More dirty ranges than one PAGEMAP_SCAN vector holds (every other page).
        let count = AsyncWPTracker.regionsPerCall * 2 + 100
        let child = try TestChild(pages: count * 2)
        let process = try TrackedProcess.attach(pid: child.pid, tracker: .async)
        defer { try? process.detach() }
        try process.startTracking()
        _ = try process.scanDirty()
        for index in stride(from: 0, to: count * 2, by: 2) { child.process.send("set \(index) 1") }
        for _ in 0..<count { _ = try child.process.readLine() }
        let clock = ContinuousClock()
        let started = clock.now
        let reported = pages(of: child, in: try process.scanDirty())
        let elapsed = clock.now - started
        print("async scan of \(count * 2) pages with \(count) scattered dirty pages: \(elapsed)")
        #expect(reported == Set(stride(from: 0, to: count * 2, by: 2)))
    }
}

@Suite(.serialized)
struct ZapTests {
    @Test(arguments: uffdTrackers)
    func aZappedPageIsReportedOnceEvenWithoutAWrite(kind: TrackerKind) throws {
        let child = try TestChild(pages: 64)
        let process = try TrackedProcess.attach(pid: child.pid, tracker: kind)
        defer { try? process.detach() }
        try process.startTracking()
        try child.set(10, 99)
        try child.set(11, 98)
        #expect(pages(of: child, in: try process.scanDirty()) == [10, 11])
        // MADV_DONTNEED: the pages now read as zeros, a change the leecher must see.
        try child.process.call("zap 10 2")
        #expect(pages(of: child, in: try process.scanDirty()) == [10, 11])
        #expect(pages(of: child, in: try process.scanDirty()).isEmpty, "reported once")
        try child.set(11, 5)
        #expect(pages(of: child, in: try process.scanDirty()) == [11], "and tracked again afterwards")
    }
}

extension ZapTests {
    @Test func theSecondWalkFindsZappedPagesOnAnyKernel() throws {
        // The async tracker on memory of our own, forced to walk for zapped
        // pages even where the probe found the first walk enough.
        print("this kernel needs the second (zapped pages) walk: \(AsyncWPTracker.zappedPagesNeedSecondScan)")
        let uffd = try Userfaultfd.forOwnProcess()
        _ = try uffd.enable([.wpAsync, .wpUnpopulated])
        let length = 16 * Int(pageSize)
        let memory = try #require(mmap(nil, length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0))
        defer { munmap(memory, length) }
        let base = UInt64(UInt(bitPattern: memory))
        let range = AddressRange(start: base, end: base + UInt64(length))
        let tracker = try AsyncWPTracker(uffd: uffd, pid: getpid(), zapScan: true)
        defer { tracker.close() }
        memory.storeBytes(of: 1, toByteOffset: 3 * Int(pageSize), as: UInt8.self)
        try tracker.track(range)
        #expect(try tracker.scan([range]).dirty.isEmpty)
        madvise(memory + 3 * Int(pageSize), Int(pageSize), MADV_DONTNEED)
        // The zapped-page query on its own finds exactly the emptied slot.
        let probeRange = try tracker.zappedOnly(range)
        let page3 = AddressRange(start: base + 3 * pageSize, end: base + 4 * pageSize)
        #expect(probeRange == [page3])
        #expect(try tracker.scan([range]).dirty == [page3])
        #expect(try tracker.scan([range]).dirty.isEmpty, "reported once")
        // A vector of 2 entries for 8 scattered pages: the scan loops to the end.
        for index in stride(from: 0, to: 16, by: 2) { memory.storeBytes(of: 9, toByteOffset: index * Int(pageSize), as: UInt8.self) }
        #expect(try tracker.scan([range], capacity: 2).dirty.count == 8)
        memory.storeBytes(of: 2, toByteOffset: 3 * Int(pageSize), as: UInt8.self)
        #expect(try tracker.scan([range]).dirty == [page3], "and protected again")
    }
}


@Suite(.serialized)
struct TrackerEdgeTests {
    @Test(arguments: uffdTrackers)
    func writesByTheKernelAreReported(kind: TrackerKind) throws {
        let child = try TestChild(pages: 64)
        let process = try TrackedProcess.attach(pid: child.pid, tracker: kind)
        defer { try? process.detach() }
        try process.startTracking()
        try child.process.call("kread 6")  // touched half
        try child.process.call("kread 50") // never touched
        #expect(pages(of: child, in: try process.scanDirty()) == [6, 50])
    }

    @Test(arguments: uffdTrackers)
    func concurrentReadsWhileTheProcessWrites(kind: TrackerKind) throws {
        let child = try TestChild(pages: 256)
        let process = try TrackedProcess.attach(pid: child.pid, tracker: kind)
        defer { try? process.detach() }
        try process.startTracking()
        child.process.send("w 9 4000 2")
        // Four threads read the whole region while the child writes.
        let failures = Counter()
        let threads = (0..<4).map { _ in
            Thread {
                var buffer = [UInt8](repeating: 0, count: 256 * Int(pageSize))
                for _ in 0..<20 {
                    do { _ = try buffer.withUnsafeMutableBytes { try process.read([child.region], into: $0) } } catch { failures.add() }
                }
            }
        }
        threads.forEach { $0.join() }
        let written = Set(try child.process.readLine().split(separator: " ").dropFirst().compactMap { Int($0) })
        #expect(failures.value == 0)
        // Every page written after the last read covering it is still reported;
        // to check the whole contract, read once more after a scan and compare
        // with the child's own view.
        let dirty = pages(of: child, in: try process.scanDirty())
        _ = dirty
        var buffer = [UInt8](repeating: 0, count: 256 * Int(pageSize))
        _ = try buffer.withUnsafeMutableBytes { try process.read([child.region], into: $0) }
        #expect(pages(of: child, in: try process.scanDirty()).isEmpty, "the child is idle: nothing after the last read")
        #expect(!written.isEmpty)
    }

    @Test func aProcessThatExitsGivesClearErrors() throws {
        let child = try TestChild(pages: 16)
        let process = try TrackedProcess.attach(pid: child.pid)
        try process.startTracking()
        child.process.kill()
        func message(_ body: () throws -> Void) -> String {
            do { try body(); return "no error" } catch { return "\(error)" }
        }
        let pid = child.pid
        let gone = "the process has exited (its memory is gone; start again with a running process)"
        #expect(message { _ = try process.refreshLayout() } == "cannot re-read the layout of pid \(pid): \(gone)")
        #expect(message { _ = try process.scanDirty() } == "cannot scan the dirty pages of pid \(pid): \(gone)")
        #expect(message { try process.freeze() } == "cannot freeze pid \(pid): \(gone)")
        var buffer = [UInt8](repeating: 0, count: Int(pageSize))
        #expect(message { _ = try buffer.withUnsafeMutableBytes { try process.read([child.page(0)], into: $0) } }
            == "cannot read the memory of pid \(pid): \(gone)")
        try? process.detach()
        #expect(message { _ = try process.scanDirty() } == "cannot scan the dirty pages of pid \(pid): it was detached (attach to it again)")
    }

    @Test func hugePagesCountWholeButNothingWrittenIsMissed() throws {
        // A region that asks for transparent huge pages: a write may report
        // its whole 2 MiB page, never less than the written page.
        let child = try TestChild(pages: 2048, huge: true)
        print("huge pages mapped before tracking: \(anonHugePages(child.pid))")
        let process = try TrackedProcess.attach(pid: child.pid, tracker: .async)
        defer { try? process.detach() }
        try process.startTracking()
        _ = try process.scanDirty()
        for seed in UInt64(1)...8 {
            let written = try child.writeRandom(seed: seed, count: 16, threads: 2)
            let reported = pages(of: child, in: try process.scanDirty())
            #expect(written.isSubset(of: reported), "seed \(seed)")
            let hugeBlocks = Set(written.map { (Int(child.base / pageSize) + $0) / 512 })
            #expect(reported.allSatisfy { hugeBlocks.contains((Int(child.base / pageSize) + $0) / 512) }, "seed \(seed)")
        }
        print("huge pages mapped after the writes: \(anonHugePages(child.pid))")
    }

    @Test func freezingWhileWritersWaitOnTheSyncTrackerIsSafe() throws {
        let child = try TestChild(pages: 512)
        let process = try TrackedProcess.attach(pid: child.pid, tracker: .sync)
        defer { try? process.detach() }
        try process.startTracking()
        child.process.send("w 5 20000 4")
        for _ in 0..<5 {
            try process.freeze()
            try process.thaw()
        }
        let written = Set(try child.process.readLine().split(separator: " ").dropFirst().compactMap { Int($0) })
        #expect(written.isSubset(of: pages(of: child, in: try process.scanDirty())))
    }
}

/// A thread for tests that need real OS threads (not Swift tasks).
final class Thread: @unchecked Sendable {
    // Invariant: `handle` is written once in init, before anyone calls join.
    private var handle = pthread_t()
    private let body: () -> Void

    init(_ body: @escaping () -> Void) {
        self.body = body
        let context = Unmanaged.passRetained(self).toOpaque()
        pthread_create(&handle, nil, { argument in
            let thread = Unmanaged<Thread>.fromOpaque(argument!).takeRetainedValue()
            thread.body()
            return nil
        }, context)
    }

    func join() { pthread_join(handle, nil) }
}

/// A counter several threads may bump.
final class Counter: Sendable {
    private let count = Mutex(0)
    func add() { count.withLock { $0 += 1 } }
    var value: Int { count.withLock { $0 } }
}

/// AnonHugePages of /proc/PID/smaps_rollup, as printed there.
private func anonHugePages(_ pid: Int32) -> String {
    guard let file = fopen("/proc/\(pid)/smaps_rollup", "r") else { return "?" }
    defer { fclose(file) }
    var line = [CChar](repeating: 0, count: 256)
    while fgets(&line, 256, file) != nil {
        let text = line.withUnsafeBufferPointer { String(cString: $0.baseAddress!) }
        if text.hasPrefix("AnonHugePages") { return text.split(separator: " ").dropFirst().joined(separator: " ").filter { $0 != "\n" } }
    }
    return "?"
}

/// The memwriter binary beside the test binary, when it was built.
private let memwriterPath: String? = {
    var buffer = [CChar](repeating: 0, count: 4096)
    let n = readlink("/proc/self/exe", &buffer, buffer.count - 1)
    guard n > 0 else { return nil }
    var directory = String(decoding: buffer[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self)
    for _ in 0..<4 {
        if let slash = directory.lastIndex(of: "/") { directory = String(directory[..<slash]) }
        if access(directory + "/memwriter", X_OK) == 0 { return directory + "/memwriter" }
    }
    return nil
}()

@Suite(.serialized, .enabled(if: memwriterPath != nil, "memwriter is not built: run `swift build --product memwriter` first"))
struct MemwriterTrackingTests {
    /// A leecher in miniature against memwriter under full load (writers,
    /// mapping churn, heap growth, zaps, shared and memfd regions): copy
    /// everything once, then only what scans report, freeze, copy the last
    /// dirty set, and compare the copy with the frozen memory byte for byte.
    @Test(arguments: [TrackerKind.async, .sync])
    func theCopyMatchesTheFrozenMemory(kind: TrackerKind) throws {
        var arguments = ["--mib", "16", "--shared", "2", "--memfd", "2", "--threads", "3",
                         "--churn", "--heap-grow", "--zap", "--rate", kind == .async ? "0" : "20000"]
        if let extra = getenv("FERRY_MEMWRITER_ARGS") { arguments = String(cString: extra).split(separator: " ").map(String.init) }
        let writer = try TestProcess(executable: memwriterPath!, arguments: arguments)
        var regions: [AddressRange] = []
        while true {
            let fields = try writer.readLine().split(separator: " ")
            if fields.first == "pid" { break }
            if fields.count == 4, fields[0] == "region",
               let start = UInt64(fields[2].dropFirst(2), radix: 16), let end = UInt64(fields[3].dropFirst(2), radix: 16) {
                regions.append(AddressRange(start: start, end: end))
            }
        }
        regions = Ranges.merge(regions)
        let size = Int(regions.reduce(0) { $0 + $1.length })
        let process = try TrackedProcess.attach(pid: writer.pid, tracker: kind)
        defer { try? process.detach() }
        try process.startTracking()

        // The copy: the regions back to back, as read() lays them out.
        var copy = [UInt8](repeating: 0, count: size)
        _ = try copy.withUnsafeMutableBytes { try process.read(regions, into: $0) }
        func offset(of address: UInt64) -> Int {
            var base = 0
            for region in regions {
                if region.contains(address) { return base + Int(address - region.start) }
                base += Int(region.length)
            }
            fatalError("address outside the regions")
        }
        var scratch = [UInt8](repeating: 0, count: size)
        func pull(_ dirty: [AddressRange]) throws {
            let wanted = Ranges.intersect(dirty, regions)
            guard !wanted.isEmpty else { return }
            _ = try scratch.withUnsafeMutableBytes { try process.read(wanted, into: $0) }
            var cursor = 0
            copy.withUnsafeMutableBytes { destination in
                scratch.withUnsafeBytes { source in
                    for range in wanted {
                        memcpy(destination.baseAddress! + offset(of: range.start), source.baseAddress! + cursor, Int(range.length))
                        cursor += Int(range.length)
                    }
                }
            }
        }
        var rounds = 0
        var pulledPages: UInt64 = 0
        for _ in 0..<15 {
            usleep(10_000)
            _ = try process.refreshLayout()
            let dirty = try process.scanDirty()
            pulledPages += Ranges.intersect(dirty, regions).reduce(0) { $0 + $1.pageCount }
            try pull(dirty)
            rounds += 1
        }
        try process.freeze()
        _ = try process.refreshLayout()
        try pull(try process.scanDirty())
        var frozen = [UInt8](repeating: 0, count: size)
        _ = try frozen.withUnsafeMutableBytes { try process.read(regions, into: $0) }
        try process.thaw()
        var mismatched = 0
        for page in 0..<(size / Int(pageSize)) {
            let range = (page * Int(pageSize))..<((page + 1) * Int(pageSize))
            let differs = copy.withUnsafeBytes { a in frozen.withUnsafeBytes { b in
                memcmp(a.baseAddress! + range.lowerBound, b.baseAddress! + range.lowerBound, Int(pageSize)) != 0
            } }
            if differs {
                mismatched += 1
                if mismatched <= 5 {
                    let w = { (a: [UInt8], o: Int) in a.withUnsafeBytes { $0.load(fromByteOffset: o, as: UInt64.self) } }
                    let diffAt = range.first { copy[$0] != frozen[$0] }!
                    print("  page \(page): copy \(String(w(copy, range.lowerBound), radix: 16)) \(String(w(copy, range.lowerBound + 8), radix: 16)) frozen \(String(w(frozen, range.lowerBound), radix: 16)) \(String(w(frozen, range.lowerBound + 8), radix: 16)) first diff at +\(diffAt - range.lowerBound)")
                }
            }
        }
        print("[\(kind.rawValue)] memwriter: \(rounds) rounds, \(pulledPages) pages re-pulled, \(mismatched) of \(size / Int(pageSize)) pages differ at the freeze")
        #expect(mismatched == 0)
        try process.detach()
        writer.send("count")
        #expect(try writer.readLine().hasPrefix("count "), "memwriter runs on after detach")
    }
}

extension TrackerEdgeTests {
    @Test(arguments: uffdTrackers)
    func trackingStopsAndStartsAgain(kind: TrackerKind) throws {
        let child = try TestChild(pages: 32)
        let process = try TrackedProcess.attach(pid: child.pid, tracker: kind)
        defer { try? process.detach() }
        try process.startTracking()
        try child.set(1, 1)
        try process.stopTracking()
        #expect(!process.isTracking)
        #expect(try process.scanDirty().isEmpty, "not tracking: nothing to report")
        try child.set(2, 2) // unprotected: no fault, no block
        try process.startTracking()
        #expect(pages(of: child, in: try process.scanDirty()).isEmpty)
        try child.set(3, 3)
        #expect(pages(of: child, in: try process.scanDirty()) == [3])
        // The sync tracker cannot register private file mappings (.data, .bss):
        // they are listed and reported dirty by every scan.
        if kind == .sync {
            #expect(!process.unprotectable.isEmpty)
            let always = try process.scanDirty()
            #expect(process.unprotectable.allSatisfy { region in always.contains { $0.start <= region.start && region.end <= $0.end } })
        } else {
            #expect(process.unprotectable.isEmpty)
        }
    }
}

struct RangesTests {
    private func r(_ start: UInt64, _ end: UInt64) -> AddressRange { AddressRange(start: start, end: end) }

    @Test func mergeIntersectSubtract() {
        #expect(Ranges.merge([r(30, 40), r(0, 10), r(10, 20), r(35, 50)]) == [r(0, 20), r(30, 50)])
        #expect(Ranges.merge([r(0, 10), r(5, 5)]) == [r(0, 10)])
        #expect(Ranges.intersect([r(0, 20), r(30, 50)], [r(10, 35), r(45, 60)]) == [r(10, 20), r(30, 35), r(45, 50)])
        #expect(Ranges.subtract([r(0, 20), r(30, 50)], [r(10, 35), r(45, 60)]) == [r(0, 10), r(35, 45)])
        #expect(Ranges.contains([r(0, 10), r(20, 30)], 25) && !Ranges.contains([r(0, 10), r(20, 30)], 10))
        #expect(Ranges.fromPages([3, 1, 2, 7]) == [r(pageSize, 4 * pageSize), r(7 * pageSize, 8 * pageSize)])
    }

    @Test func randomizedAgainstPageSets() {
        var generator = SystemRandomNumberGenerator()
        func randomRanges() -> [AddressRange] {
            (0..<Int.random(in: 0...6, using: &generator)).map { _ in
                let start = UInt64.random(in: 0..<60, using: &generator)
                return r(start, start + UInt64.random(in: 0...10, using: &generator))
            }
        }
        func units(_ ranges: [AddressRange]) -> Set<UInt64> {
            Set(ranges.flatMap { Array($0.start..<$0.end) })
        }
        for _ in 0..<500 {
            let a = Ranges.merge(randomRanges()), b = Ranges.merge(randomRanges())
            #expect(units(Ranges.intersect(a, b)) == units(a).intersection(units(b)))
            #expect(units(Ranges.subtract(a, b)) == units(a).subtracting(units(b)))
            #expect(zip(a, a.dropFirst()).allSatisfy { $0.end < $1.start }, "merged ranges neither touch nor overlap")
        }
    }
}
