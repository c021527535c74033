// The leecher's other destination: live memory that a program uses the
// moment Finalize returns, with the rest filled behind it by post-copy.
//
// Why two phases: pre-copy sends a page again each time it is written, but a
// userfaultfd page can be installed only once. So until Finalize pages are
// staged (an anonymous arena, one slot per page, reused when a page comes
// again). At Finalize the layout is final: the migrated regions are mapped
// empty and registered for missing faults (MissingFaultMemory), and the
// memory is handed over at once. Behind it, a local fill thread installs the
// pages staged clean in large UFFDIO_COPY batches, the leecher's post-copy
// installs the remote pages as they arrive, and a touch of a page that is
// not there yet is installed from the stage at once if it was held clean, or
// becomes a priority request that jumps the leecher's background queue.
//
// Hugetlb regions are mapped with huge pages of their size and filled only
// in whole huge pages (MissingFaultMemory gathers the 4 KiB pages of each
// until the last arrives). A touch anywhere in a huge page stages the pages
// of it held clean and asks the leecher for the rest of it at once.
import Foundation
import FerrySystem
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// Migrated memory handed to its consumer: the regions with their names,
/// where each lives here, and the userfaultfd machinery filling it.
public typealias MigratedMemory = MissingFaultMemory

/// Pages touched before they arrived, waiting for the leecher's puller.
///
/// `@unchecked Sendable` invariant: `pages` and `waiter` are only touched under `lock`.
final class PriorityRequests: @unchecked Sendable {
    private let lock = NSLock()
    private var pages: [UInt64] = []
    private var waiter: CheckedContinuation<[UInt64], Never>?
    private var closed = false

    func push(_ page: UInt64) {
        lock.lock()
        if let waiter {
            self.waiter = nil
            lock.unlock()
            waiter.resume(returning: [page])
            return
        }
        pages.append(page)
        lock.unlock()
    }

    /// Waits for the next touched pages; empty when cancelled or closed.
    func next() async -> [UInt64] {
        await withTaskCancellationHandler {
            await withCheckedContinuation { continuation in
                lock.lock()
                if !pages.isEmpty || closed || Task.isCancelled {
                    let taken = pages
                    pages.removeAll()
                    lock.unlock()
                    continuation.resume(returning: taken)
                } else {
                    waiter = continuation
                    lock.unlock()
                }
            }
        } onCancel: {
            close()
        }
    }

    /// Ends every wait, now and later.
    func close() {
        lock.lock()
        closed = true
        let waiter = self.waiter
        self.waiter = nil
        lock.unlock()
        waiter?.resume(returning: [])
    }
}

public struct LiveMemoryOptions: Sendable {
    /// How long a touched page may wait (through reconnects) before the
    /// toucher gets SIGBUS. Longer than the seeder's grace period by default,
    /// so a reconnect within it never fails a touch.
    public var faultTimeout: Duration = .seconds(30)
    /// Pages per UFFDIO_COPY of the local fill: 1 MiB, past which larger
    /// calls gain nothing (design brief: 4.5 GB/s at 64 KiB already).
    public var fillBatchPages = 256
    /// Virtual space reserved for staging pre-copy pages (never committed
    /// until written): enough for any process we migrate on one host.
    public var stagingReserve: UInt64 = 1 << 40
    /// Background ReadAt requests in flight during post-copy, and pages in
    /// each. Touched pages travel on their own (companion) connection, so
    /// they do not queue behind these replies; what the window still bounds
    /// is the CPU the fill takes from the touch path. On our 2-core loopback
    /// (Tools/bench-postcopy, release, seeder in its own process, same-run
    /// ratios): 1 x 64 pages left the fill at 35-45 % of the link (one
    /// request at a time cannot hide the round trip); 4 x 64 gave touches at
    /// 1.8-2.6x the round trip with the fill at 74-87 %; 2 x 256 touches up
    /// to 3.7x.
    public var postCopyRequestsInFlight = 4
    public var postCopyPagesPerRequest = 64
    /// Another process on this host to own the memory (a restored program):
    /// the regions are mapped inside it and its touches are served from here.
    /// nil: this process.
    public var targetPid: Int32? = nil
    public init() {}
}

/// A `PageSink` that ends in live, userfaultfd-backed memory of this process.
///
/// `@unchecked Sendable` invariant: `slots`, `zeroPages`, `nextSlot` and
/// `arena` contents are written only before `activate` (by the leecher's
/// task) and only read after it (by the fault handler and fill threads,
/// started by `activate`, which orders the writes before them); `memory`,
/// `readyWaiters` and `fillError` live in `state`, under its lock.
public final class LiveMemorySink: PageSink, @unchecked Sendable {
    public let options: LiveMemoryOptions
    private let arena: UnsafeMutableRawPointer
    private var slots: [UInt64: UInt32] = [:]
    private var nextSlot: UInt32 = 0
    private static let zeroSlot = UInt32.max
    /// A page nothing backs in the source: SIGBUS when touched.
    private static let holeSlot = UInt32.max - 1
    /// Pages staged clean at Finalize, in runs, for the local fill.
    private var cleanRuns: [AddressRange] = []
    /// Pages installed (or staged) as holes: SIGBUS in this memory, zeros
    /// in its checksum, as the seeder hashes them.
    private let holes = HolePages()
    private var activeMemory: MissingFaultMemory?
    let priority = PriorityRequests()

    private struct State {
        var memory: MissingFaultMemory?
        var failure: String?
        var readyWaiters: [CheckedContinuation<MissingFaultMemory, any Error>] = []
        var fillDone = false
        var fillWaiters: [CheckedContinuation<Void, Never>] = []
        var fillError: String?
    }
    private let state = Mutex(State())

    public init(options: LiveMemoryOptions = .init()) throws {
        self.options = options
        // SAFETY: a reservation only; pages are committed as slots are written.
        let pointer = mmap(nil, Int(options.stagingReserve), PROT_READ | PROT_WRITE,
                           MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
        guard pointer != MAP_FAILED, let pointer else {
            throw MigrationError.image("cannot reserve \(options.stagingReserve >> 30) GiB of address space to stage pages: "
                                       + "\(String(cString: strerror(errno))); lower LiveMemoryOptions.stagingReserve")
        }
        // The post-copy guardian is a fork of this process (FaultGuardian.swift):
        // copying the page tables of gigabytes of staged pages would delay the
        // hand-over, and the guardian never reads them.
        _ = madvise(pointer, Int(options.stagingReserve), MADV_DONTFORK)
        arena = pointer
    }

    deinit {
        munmap(arena, Int(options.stagingReserve))
    }

    // MARK: - PageSink

    public func store(_ range: AddressRange, data: UnsafeRawBufferPointer) throws {
        holes.backed(range)
        if let memory = activeMemory {
            try memory.install(range, data: data)
            return
        }
        var page = range.start
        while page < range.end {
            let slot: UInt32
            if let existing = slots[page], existing != Self.zeroSlot, existing != Self.holeSlot {
                slot = existing
            } else {
                slot = nextSlot
                nextSlot += 1
                guard UInt64(nextSlot) * pageSize <= options.stagingReserve else {
                    throw MigrationError.image("more pages than the staging reserve holds; raise LiveMemoryOptions.stagingReserve")
                }
                slots[page] = slot
            }
            // SAFETY: the slot is inside the reservation (checked above); source is inside `data`.
            memcpy(arena + Int(UInt64(slot) * pageSize), data.baseAddress! + Int(page - range.start), Int(pageSize))
            page += pageSize
        }
    }

    public func storeHole(_ range: AddressRange) throws {
        holes.insert(range)
        if let memory = activeMemory {
            memory.installHole(range)
            return
        }
        var page = range.start
        while page < range.end {
            slots[page] = Self.holeSlot
            page += pageSize
        }
    }

    public func storeZero(_ range: AddressRange) throws {
        holes.backed(range)
        if let memory = activeMemory {
            try memory.installZero(range)
            return
        }
        var page = range.start
        while page < range.end {
            slots[page] = Self.zeroSlot
            page += pageSize
        }
    }

    // MARK: - Hand-over

    /// Called by the leecher right after Finalize: maps the final layout's
    /// migrated regions, starts fault handling and the local fill of the
    /// `clean` pages (held, and not written since), and hands the memory out.
    /// Hugetlb regions are mapped with huge pages of their size, from this
    /// host's pool.
    ///
    /// Checked when the leecher learns the layout (before pulling, so the
    /// source runs on untouched): the pool must have a free huge page of its
    /// size for each huge page of the hugetlb regions, or the mapping would
    /// fail only after the freeze. (The kernel's own reservation at mmap time
    /// is the final word; this is the early, friendly form of it.)
    static func checkHugePages(_ layout: [Region], pool: (UInt64) -> Int? = HugetlbPool.available(pageSize:)) throws {
        var needed: [UInt64: UInt64] = [:]
        for region in layout where region.kind == .migrate && region.isHugetlb {
            needed[region.pageSize, default: 0] += region.range.length / region.pageSize
        }
        for (size, count) in needed.sorted(by: { $0.key < $1.key }) {
            guard let free = pool(size), UInt64(max(0, free)) < count else { continue }
            let kib = size >> 10
            let regions = layout.filter { $0.kind == .migrate && $0.pageSize == size }
                .map { "\($0.range) (\($0.name.isEmpty ? "anonymous" : $0.name))" }
            throw MigrationError.badArgument(
                "post-copy into live memory needs \(count) free huge pages of \(kib) KiB for the hugetlb regions "
                + "\(regions.joined(separator: ", ")), and this host's pool has \(free): raise "
                + "/sys/kernel/mm/hugepages/hugepages-\(kib)kB/nr_hugepages by at least \(count - UInt64(max(0, free))) "
                + "(vm.nr_hugepages for the default size) and migrate again; nothing was frozen")
        }
    }

    func activate(layout: [Region], clean: [AddressRange]) throws -> MissingFaultMemory {
        let areas = layout.filter { $0.kind == .migrate && $0.range.length > 0 }
            .map { MissingFaultMemory.Area($0.range, pageSize: $0.pageSize) }
        let memory = try options.targetPid.map {
            try MissingFaultMemory.inProcess(pid: $0, areas: areas, faultTimeout: options.faultTimeout)
        } ?? MissingFaultMemory.inOwnProcess(areas: areas, faultTimeout: options.faultTimeout)
        cleanRuns = clean
        activeMemory = memory
        let priority = self.priority
        try memory.start { [weak self] page in
            guard let self else { return }
            // Held clean: install it now, no network. Otherwise the puller fetches
            // it (what it lacks of a huge page) first.
            let unit = memory.mapping(containing: page)?.pageSize ?? pageSize
            if (try? self.installHeldClean(AddressRange(start: page, end: page + unit), into: memory)) ?? false { return }
            priority.push(page)
        }
        let thread = Foundation.Thread { [self] in
            // The background fill yields the CPU to whatever serves a touched
            // page: on a small host they compete for the same cores.
            lowerCurrentThreadPriority()
            var failure: String? = nil
            for run in cleanRuns {
                var start = run.start
                while start < run.end {
                    let end = min(run.end, start + UInt64(options.fillBatchPages) * pageSize)
                    do {
                        _ = try installStaged(AddressRange(start: start, end: end), into: memory)
                    } catch {
                        failure = "\(error)"
                        break
                    }
                    start = end
                }
                if failure != nil { break }
            }
            let waiters = state.withLock { s in
                s.fillDone = true
                s.fillError = failure
                defer { s.fillWaiters.removeAll() }
                return s.fillWaiters
            }
            for waiter in waiters { waiter.resume() }
        }
        thread.name = "ferry-postcopy-fill"
        thread.start()
        let waiters = state.withLock { s in
            s.memory = memory
            defer { s.readyWaiters.removeAll() }
            return s.readyWaiters
        }
        for waiter in waiters { waiter.resume(returning: memory) }
        return memory
    }

    /// Installs the staged pages of `range` that were held clean; returns
    /// false when a page of it was not (it must be fetched instead).
    private func installStaged(_ range: AddressRange, into memory: MissingFaultMemory) throws -> Bool {
        guard heldClean(range) else { return false }
        // Runs of data slots that are consecutive in the arena are one install;
        // zero pages one zero-page install.
        var page = range.start
        while page < range.end {
            guard let slot = slots[page] else { return false }
            var end = page + pageSize
            if slot == Self.zeroSlot {
                while end < range.end, slots[end] == Self.zeroSlot { end += pageSize }
                try memory.installZero(AddressRange(start: page, end: end))
            } else if slot == Self.holeSlot {
                while end < range.end, slots[end] == Self.holeSlot { end += pageSize }
                memory.installHole(AddressRange(start: page, end: end))
            } else {
                var next = slot + 1
                while end < range.end, let s = slots[end], s == next { end += pageSize; next += 1 }
                // SAFETY: slots slot..<next are inside the arena and written before activation.
                let bytes = UnsafeRawBufferPointer(start: arena + Int(UInt64(slot) * pageSize), count: Int(end - page))
                try memory.install(AddressRange(start: page, end: end), data: bytes)
            }
            page = end
        }
        return true
    }

    /// Installs (stages, in a huge page) the pages of `range` held clean;
    /// returns whether they were all of it.
    private func installHeldClean(_ range: AddressRange, into memory: MissingFaultMemory) throws -> Bool {
        if range.length == pageSize { return try installStaged(range, into: memory) }
        var low = 0, high = cleanRuns.count
        while low < high {
            let mid = (low + high) / 2
            if cleanRuns[mid].end <= range.start { low = mid + 1 } else { high = mid }
        }
        var held: UInt64 = 0
        while low < cleanRuns.count && cleanRuns[low].start < range.end {
            let part = AddressRange(start: max(range.start, cleanRuns[low].start), end: min(range.end, cleanRuns[low].end))
            if try installStaged(part, into: memory) { held += part.length }
            low += 1
        }
        return held == range.length
    }

    /// Whether one run of `cleanRuns` (sorted, disjoint) covers all of `range`.
    private func heldClean(_ range: AddressRange) -> Bool {
        var low = 0, high = cleanRuns.count
        while low < high {
            let mid = (low + high) / 2
            if cleanRuns[mid].end <= range.start { low = mid + 1 } else { high = mid }
        }
        return low < cleanRuns.count && cleanRuns[low].start <= range.start && range.end <= cleanRuns[low].end
    }

    private let paused = Atomic<Bool>(false)

    /// Holds back the post-copy background fill: only touched pages are
    /// fetched until it is resumed. For measuring touch latency without
    /// load; a migration never completes while paused.
    public func pauseBackgroundFill(_ pause: Bool) {
        paused.store(pause, ordering: .sequentiallyConsistent)
        // Wakes the puller, which waits for touches while paused; the address is in no region.
        if !pause { priority.push(UInt64.max & ~(pageSize - 1)) }
    }

    var backgroundFillPaused: Bool { paused.load(ordering: .sequentiallyConsistent) }

    /// The migrated memory, as soon as Finalize has returned: the program
    /// may use it at once; pages not there yet are fetched on first touch.
    public func migratedMemory() async throws -> MissingFaultMemory {
        try await withCheckedThrowingContinuation { continuation in
            let ready: Result<MissingFaultMemory, any Error>? = state.withLock { s in
                if let memory = s.memory { return .success(memory) }
                if let failure = s.failure { return .failure(MigrationError.image(failure)) }
                s.readyWaiters.append(continuation)
                return nil
            }
            if let ready { continuation.resume(with: ready) }
        }
    }

    /// Waits until the local fill has installed every staged clean page.
    func waitForLocalFill() async throws {
        await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
            let done = state.withLock { s in
                if s.fillDone { return true }
                s.fillWaiters.append(continuation)
                return false
            }
            if done { continuation.resume() }
        }
        if let error = state.withLock({ $0.fillError }) {
            throw MigrationError.image("installing the pages held locally failed: \(error)")
        }
    }

    /// The final layout as manifest entries, with the BLAKE2b-256 of each
    /// migrated region's installed bytes, to compare with the frozen source.
    /// `file` names the local address (there is no file). Throws unless
    /// every page is installed.
    func manifestRegions(layout: [Region]) throws -> [ManifestRegion] {
        guard let memory = activeMemory else { return [] }
        guard memory.isComplete, memory.failureReason == nil else {
            throw MigrationError.image(memory.failureReason.map { "\($0)" }
                                       ?? "post-copy ended with \(memory.totalPages - memory.installedPages) pages missing")
        }
        return try layout.map { region in
            var entry = ManifestRegion(start: region.start, end: region.end, prot: region.permissions, offset: region.offset,
                                       device: region.device, inode: region.inode, name: region.name,
                                       kind: region.kind.rawValue, file: nil, blake2b: nil)
            if region.isHugetlb { entry.pageSize = region.pageSize }
            if region.kind == .migrate, region.end > region.start, let local = memory.localAddress(of: region.start) {
                let holes = self.holes.ranges(from: region.start, to: region.end)
                entry.holes = holes.isEmpty ? nil : holes.map { [$0.start, $0.end] }
                // Hole pages raise SIGBUS here (and EIO through /proc): hashed as zeros, unread.
                let holeOffsets = holes.map { AddressRange(start: $0.start - region.start, end: $0.end - region.start) }
                entry.file = "memory:0x" + String(local, radix: 16)
                if let pid = options.targetPid {
                    entry.file = "pid \(pid) memory:0x" + String(local, radix: 16)
                }
                entry.blake2b = try Self.checksum(pid: options.targetPid, at: local, length: region.end - region.start,
                                                  holes: holeOffsets)
            }
            return entry
        }
    }

    /// BLAKE2b-256 of `length` bytes at `address`, in this process (`pid`
    /// nil) or in process `pid` through /proc, in steps of at most 1 MiB;
    /// the pages of `holes` (offsets from `address`) count as zeros.
    private static func checksum(pid: Int32?, at address: UInt64, length: UInt64, holes: [AddressRange]) throws -> String {
        var fd: Int32 = -1
        if let pid {
            // Through a live thread when the target's main thread has exited.
            let (opened, path) = ThreadGroup.openProcFile("mem", of: pid, flags: O_RDONLY)
            fd = opened
            guard fd >= 0 else {
                throw MigrationError.image("cannot open \(path) to check the migrated memory: \(String(cString: strerror(errno)))")
            }
        }
        defer { if fd >= 0 { close(fd) } }
        var hash = Blake2b256()
        var buffer = [UInt8](repeating: 0, count: 1 << 20)
        let zeros = [UInt8](repeating: 0, count: 1 << 20)
        var done: UInt64 = 0
        var nextHole = 0
        while done < length {
            while nextHole < holes.count, holes[nextHole].end <= done { nextHole += 1 }
            let inHole = nextHole < holes.count && holes[nextHole].start <= done
            let stop = inHole ? holes[nextHole].end : (nextHole < holes.count ? holes[nextHole].start : length)
            let want = Int(min(UInt64(buffer.count), stop - done))
            if inHole {
                zeros.withUnsafeBytes { hash.update(UnsafeRawBufferPointer(rebasing: $0[0..<want])) }
            } else if let pid {
                let got = buffer.withUnsafeMutableBytes { pread(fd, $0.baseAddress, want, off_t(Int64(bitPattern: address + done))) }
                guard got == want else {
                    throw MigrationError.image("cannot read pid \(pid)'s migrated memory at 0x\(String(address + done, radix: 16)) to check it")
                }
                buffer.withUnsafeBytes { hash.update(UnsafeRawBufferPointer(rebasing: $0[0..<want])) }
            } else {
                // SAFETY: the region is mapped here and every page of it
                // outside the holes installed (manifestRegions checked).
                hash.update(UnsafeRawBufferPointer(start: UnsafeRawPointer(bitPattern: UInt(address + done)), count: want))
            }
            done += UInt64(want)
        }
        return hash.finish().hexString
    }

    /// The migration failed: waiting consumers get the error, touched and
    /// future touches of missing pages get SIGBUS rather than wrong data.
    func fail(_ reason: String) {
        priority.close()
        let waiters = state.withLock { s in
            s.failure = reason
            defer { s.readyWaiters.removeAll() }
            return s.readyWaiters
        }
        for waiter in waiters { waiter.resume(throwing: MigrationError.image(reason)) }
        activeMemory?.fail(reason)
    }

    /// Every page is installed and checked: stop fault handling.
    func finish() {
        priority.close()
        activeMemory?.finish()
    }
}
