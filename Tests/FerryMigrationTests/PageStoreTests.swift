import Foundation
import Testing
@testable import FerryMigration

private func region(_ start: UInt64, _ end: UInt64, name: String = "", kind: RegionKind = .migrate) -> Region {
    Region(range: AddressRange(start: start, end: end), permissions: "rw-p", offset: 0, device: "00:00",
           inode: 0, name: name, kind: kind)
}

private func pages(_ start: UInt64, _ count: UInt64) -> AddressRange {
    AddressRange(start: start, end: start + count * pageSize)
}

@Suite struct PageStoreTests {
    @Test func countsOnlyMigratableRegions() {
        let store = PageStore(layout: [region(0x10000, 0x20000), region(0x30000, 0x31000, kind: .recordOnly)])
        #expect(store.totalPages == 16)
        #expect(store.count(.remote) == 16)
        #expect(store.pagesToPull == 16)
    }

    @Test func stateMachineFollowsRequestsAndDirtyReports() {
        var store = PageStore(layout: [region(0x10000, 0x20000)])
        store.markRequested([pages(0x10000, 4)])
        #expect(store.count(.inFlight) == 4)
        // A dirty report while in flight makes the reply stale.
        store.markDirty([pages(0x11000, 1)])
        store.markArrived([pages(0x10000, 4)])
        #expect(store.count(.clean) == 3)
        #expect(store.state(at: 0x11000) == .dirty)
        // A dirty report on a clean page.
        store.markDirty([pages(0x10000, 1)])
        #expect(store.count(.dirty) == 2)
        #expect(store.dirtyReportCount(at: 0x10000) == 1)
        // Dirty reports on remote pages change nothing: no copy went stale.
        store.markDirty([pages(0x18000, 1)])
        #expect(store.state(at: 0x18000) == .remote)
        #expect(store.dirtyReportCount(at: 0x18000) == 0)
        // A page reported again while still dirty is not hotter.
        store.markDirty([pages(0x10000, 1)])
        #expect(store.dirtyReportCount(at: 0x10000) == 1)
        #expect(store.pagesToPull == 2 + 12)
        store.markRemoteUnlessClean()
        #expect(store.count(.remote) == 14)
        #expect(store.count(.clean) == 2)
    }

    @Test func lostRequestsAreAskedAgain() {
        var store = PageStore(layout: [region(0x10000, 0x12000)])
        store.markRequested([pages(0x10000, 2)])
        store.markLost([pages(0x10000, 2)])
        #expect(store.count(.remote) == 2)
    }

    @Test func reconcileKeepsCoveredPagesAndAddsNewOnesRemote() {
        var store = PageStore(layout: [region(0x10000, 0x14000), region(0x20000, 0x22000)])
        store.markRequested([pages(0x10000, 4), pages(0x20000, 2)])
        store.markArrived([pages(0x10000, 4), pages(0x20000, 2)])
        // The first region is split by mprotect and grows; the second goes away; a third appears.
        store.reconcile(layout: [region(0x10000, 0x12000), region(0x12000, 0x16000), region(0x40000, 0x41000)])
        #expect(store.totalPages == 7)
        #expect(store.count(.clean) == 4)
        #expect(store.state(at: 0x14000) == .remote)
        #expect(store.state(at: 0x20000) == nil)
        #expect(store.state(at: 0x40000) == .remote)
    }

    /// Marking scattered pages must change the state arrays in place. A copy
    /// (copy-on-write through a second reference) moves the array to a new
    /// buffer each time, since the old one is still alive during the copy.
    @Test func markingScatteredPagesChangesTheArraysInPlace() {
        let oneGiB: UInt64 = 1 << 30
        var store = PageStore(layout: [region(0x7f00_0000_0000, 0x7f00_0000_0000 + oneGiB)])
        func buffers() -> [UnsafeRawPointer?] {
            store.segments.flatMap { segment in
                [segment.states.withUnsafeBufferPointer { UnsafeRawPointer($0.baseAddress) },
                 segment.dirtyReports.withUnsafeBufferPointer { UnsafeRawPointer($0.baseAddress) }]
            }
        }
        let before = buffers()
        var generator = SystemRandomNumberGenerator()
        let scattered = (0..<1000).map { _ in
            pages(0x7f00_0000_0000 + UInt64.random(in: 0..<(oneGiB / pageSize), using: &generator) * pageSize, 1)
        }
        store.markRequested(scattered)
        store.markArrived(scattered)
        store.markDirty(scattered)
        store.markSent(scattered)
        store.markLost(scattered)
        #expect(buffers() == before, "a mark copied the per-page arrays")
        #expect(store.count(.clean) == Set(scattered.map(\.start)).count)
    }

    @Test func marksOutsideTheLayoutAreIgnoredAndSpanningRangesCoverEverySegment() {
        var store = PageStore(layout: [region(0x10000, 0x12000), region(0x14000, 0x16000)])
        store.markSent([AddressRange(start: 0x0, end: 0x20000)])
        #expect(store.count(.clean) == 4)
        store.markDirty([AddressRange(start: 0x11000, end: 0x15000), pages(0x90000, 3)])
        #expect(store.count(.dirty) == 2)
        #expect(store.ranges(in: [.dirty]) == [pages(0x11000, 1), pages(0x14000, 1)])
    }

    @Test func hotPagesAreLeftOutWhenAsked() {
        var store = PageStore(layout: [region(0x10000, 0x14000)])
        store.markSent([pages(0x10000, 4)])
        store.markDirty([pages(0x10000, 2)])
        store.markSent([pages(0x10000, 1)])
        store.markDirty([pages(0x10000, 1)])
        // 0x10000 went stale twice: hot; 0x11000 once.
        #expect(store.hotPages(maxHeat: 1) == 1)
        #expect(store.ranges(in: [.remote, .dirty], maxHeat: 1) == [pages(0x11000, 1)])
        #expect(store.ranges(in: [.remote, .dirty]) == [pages(0x10000, 2)])
    }

    @Test func rangesCoalesceAndSplitAtTheLimit() {
        var store = PageStore(layout: [region(0x10000, 0x20000)])
        store.markRequested([pages(0x14000, 1)])
        let remote = store.ranges(in: [.remote], maxPages: 5)
        #expect(remote == [pages(0x10000, 4), pages(0x15000, 5), pages(0x1a000, 5), pages(0x1f000, 1)])
    }
}

@Suite struct HeuristicTests {
    let layout = [region(0x10000, 0x12000, name: "/usr/bin/x"), region(0x20000, 0x22000, name: "[heap]"),
                  region(0x30000, 0x32000, name: "[stack]"), region(0x40000, 0x42000)]

    @Test func sequentialIsAddressOrder() throws {
        let store = PageStore(layout: layout)
        let order = try HeuristicName.make("sequential").order(store, layout: layout)
        #expect(order.map(\.start) == [0x10000, 0x20000, 0x30000, 0x40000])
    }

    @Test func stackAndHeapComeFirst() throws {
        let store = PageStore(layout: layout)
        let order = try HeuristicName.make("stack-heap-first").order(store, layout: layout)
        #expect(order.map(\.start) == [0x30000, 0x20000, 0x40000, 0x10000])
    }

    @Test func coldPagesComeBeforeHotOnes() throws {
        var store = PageStore(layout: layout)
        store.markSent([pages(0x10000, 1), pages(0x20000, 1)])
        store.markDirty([pages(0x10000, 1)])
        store.markSent([pages(0x10000, 1)])
        store.markDirty([pages(0x10000, 1), pages(0x20000, 1)])
        let order = try HeuristicName.make("cold-first").order(store, layout: layout)
        #expect(order.first?.start == 0x11000)
        #expect(order.last == pages(0x10000, 1))
        #expect(order.dropLast().last == pages(0x20000, 1))
        #expect(order.reduce(0) { $0 + $1.pageCount } == 8)
    }

    @Test func profileOrderFirstThenTheRest() throws {
        let path = "/tmp/ferry-profile-\(getpid()).txt"
        try "# recorded\n0x41000\n0x20000-0x22000\n".write(toFile: path, atomically: true, encoding: .utf8)
        defer { unlink(path) }
        let store = PageStore(layout: layout)
        let order = try HeuristicName.make("profile:\(path)").order(store, layout: layout)
        #expect(Array(order.prefix(2)) == [pages(0x41000, 1), pages(0x20000, 2)])
    }

    @Test func badNamesAndFilesSaySo() throws {
        #expect(throws: MigrationError.badArgument(
            "unknown heuristic 'fastest': choose sequential, stack-heap-first, cold-first or profile:FILE")) {
            try HeuristicName.make("fastest")
        }
        let path = "/tmp/ferry-badprofile-\(getpid()).txt"
        try "0x1000\nzzz\n".write(toFile: path, atomically: true, encoding: .utf8)
        defer { unlink(path) }
        #expect(throws: MigrationError.badArgument(
            "profile file \(path), line 2: expected an address or START-END, found 'zzz'")) {
            try HeuristicName.make("profile:\(path)")
        }
    }
}

@Suite struct FinalizePolicyTests {
    @Test func parsesPercentages() throws {
        #expect(try FinalizePolicy.parsePercent("95%") == 0.95)
        #expect(try FinalizePolicy.parsePercent("0.5") == 0.5)
        #expect(try FinalizePolicy.parsePercent("0%") == 0)
        #expect(throws: MigrationError.self) { try FinalizePolicy.parsePercent("101%") }
        #expect(throws: MigrationError.self) { try FinalizePolicy.parsePercent("lots") }
    }

    @Test func parsesRatios() throws {
        #expect(try FinalizePolicy.parseRatio("1.5x") == 1.5)
        #expect(try FinalizePolicy.parseRatio("2") == 2)
        #expect(try FinalizePolicy.parseRatio("inf") == .infinity)
        #expect(throws: MigrationError.badArgument(
            "cannot read 'lots' as a multiple of the memory size: write it like 1.5x, or inf for no bound")) {
            try FinalizePolicy.parseRatio("lots")
        }
    }

    func progress(_ share: Double, left: Int = 1000, rate: Double = 0, elapsed: Double = 1) -> FinalizePolicy.Progress {
        .init(cleanShare: share, pagesLeft: left, bytesPerSecond: rate, dirtyPagesPerSecond: 0,
              elapsedSeconds: elapsed, converged: false)
    }

    @Test func decidesByShareDowntimeOrDeadline() {
        let share = FinalizePolicy(cleanShare: 0.95)
        #expect(share.reason(progress(0.9)) == nil)
        #expect(share.reason(progress(0.96))?.limit == .cleanShare)
        let downtime = FinalizePolicy(cleanShare: 1, maxDowntimeMilliseconds: 10)
        // 1000 pages at 1 GB/s is about 4 ms.
        #expect(downtime.reason(progress(0.1, rate: 1e9))?.limit == .maxDowntime)
        #expect(downtime.reason(progress(0.1, rate: 1e8)) == nil)
        // A round trip counts too.
        var slow = progress(0.1, rate: 1e9)
        slow.roundTripSeconds = 0.020
        #expect(downtime.reason(slow) == nil)
        let deadline = FinalizePolicy(cleanShare: 1, maxWaitSeconds: 5)
        #expect(deadline.reason(progress(0.5, elapsed: 6))?.limit == .maxWait)
    }

    /// 1 GiB at 500 MB/s, after the first pass.
    func afterFirstPass(dirty: Int, dirtyPerSecond: Double, hot: Int = 0, moved: Double = 1.0) -> FinalizePolicy.Progress {
        let total = 262_144
        return .init(cleanShare: Double(total - dirty) / Double(total), pagesLeft: dirty,
                     pagesPullable: dirty - hot, hotPages: hot, firstPassDone: true,
                     bytesPerSecond: 5e8, dirtyPagesPerSecond: dirtyPerSecond, roundTripSeconds: 0.0002,
                     bytesMoved: UInt64(moved * Double(1 << 30)), memoryBytes: 1 << 30,
                     elapsedSeconds: 2.5, converged: false)
    }

    @Test func aConvergingWorkloadKeepsPullingUntilTheRestIsSmall() {
        let policy = FinalizePolicy()
        // 10k writes/s: 19k pages stale after the first pass (76 MB, 150 ms at the link rate).
        #expect(policy.reason(afterFirstPass(dirty: 19_000, dirtyPerSecond: 10_000)) == nil)
        // One round later: 1,400 pages (11 ms) fit the default bound.
        #expect(FinalizePolicy(cleanShare: 1).reason(afterFirstPass(dirty: 1_400, dirtyPerSecond: 10_000, moved: 1.08))?
            .limit == .maxDowntime)
    }

    @Test func aWorkloadThatOutpacesTheLinkGoesToPostCopyAfterTheFirstPass() {
        let policy = FinalizePolicy()
        // 100k writes/s: pages go stale at 400 MB/s against a 500 MB/s link.
        let reason = policy.reason(afterFirstPass(dirty: 140_000, dirtyPerSecond: 100_000))
        #expect(reason?.description.contains("cannot shrink the dirty set") == true, "\(reason.map(\.description) ?? "nil")")
        // Faster than the link: no floor at all.
        #expect(policy.reason(afterFirstPass(dirty: 140_000, dirtyPerSecond: 200_000))?.description.contains("as fast as the link") == true)
        // Before the first pass is done, the same rate does not stop it.
        var early = afterFirstPass(dirty: 140_000, dirtyPerSecond: 100_000)
        early.firstPassDone = false
        #expect(policy.reason(early) == nil)
    }

    @Test func onlyHotPagesLeftFinalizes() {
        let policy = FinalizePolicy()
        let reason = policy.reason(afterFirstPass(dirty: 30_000, dirtyPerSecond: 5_000, hot: 30_000))
        #expect(reason?.description.contains("only hot pages") == true, "\(reason.map(\.description) ?? "nil")")
        #expect(policy.reason(afterFirstPass(dirty: 30_000, dirtyPerSecond: 5_000, hot: 20_000)) == nil)
    }

    @Test func bytesMovedAreBounded() {
        let policy = FinalizePolicy()
        var progress = afterFirstPass(dirty: 30_000, dirtyPerSecond: 5_000, moved: 1.49)
        #expect(policy.reason(progress) == nil)
        progress.bytesMoved = UInt64(1.5 * Double(1 << 30))
        #expect(policy.reason(progress)?.limit == .maxPrecopy)
        #expect(FinalizePolicy(maxPrecopyRatio: .infinity).reason(progress) == nil)
    }
}

@Suite struct BatchSizerTests {
    /// A link whose throughput peaks at 512 pages a request.
    static func simulatedSeconds(_ pages: Int) -> Double {
        let bytes = Double(pages * 4096)
        let rate = pages <= 512 ? 1e9 * Double(pages) / 512 : 1e9 * 512 / Double(pages)
        return bytes / rate
    }

    @Test func climbsToTheBestSizeAndStaysNearIt() {
        var sizer = BatchSizer()
        var now = ContinuousClock.now
        var seen: [Int] = []
        for _ in 0..<(BatchSizer.window * 30) {
            let took = Duration.microseconds(Int64(Self.simulatedSeconds(sizer.pages) * 1e6))
            now += took
            sizer.observe(pages: sizer.pages, took: took, now: now)
            seen.append(sizer.pages)
        }
        // After settling it moves between the peak and its neighbours.
        let late = seen.suffix(BatchSizer.window * 10)
        #expect(late.allSatisfy { (256...1024).contains($0) }, "\(Set(late).sorted())")
        #expect(late.contains(512))
    }
}
