// The leecher's other destination: live memory that a program uses the
// moment Finalize returns, with the rest filled behind it by post-copy.
//
// Why two phases: pre-copy sends a page again each time it is written, but a
// userfaultfd page can be installed only once. So until Finalize pages are
// staged (PageSlots: an anonymous arena, one slot per page, reused when a
// page comes again). At Finalize the layout is final: the migrated regions are mapped
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
import FerrySystem
import FerryToolkit
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// Migrated memory handed to its consumer: the regions with their names,
/// where each lives here, and the userfaultfd machinery filling it.
public typealias MigratedMemory = MissingFaultMemory

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
    /// Another process on this host to own the memory (a restored program):
    /// the regions are mapped inside it and its touches are served from here.
    /// nil: this process.
    public var targetPid: Int32? = nil
    public init() {}
}

/// A destination that ends in live, userfaultfd-backed memory: of this
/// process, or of `LiveMemoryOptions.targetPid`'s.
///
/// `@unchecked Sendable` invariant: `staged` (slots and their bytes),
/// `cleanRuns` and `activeMemory` are written only up to `activate` (by the
/// leecher's task) and only read after it (by the fault handler and fill
/// threads, started by `activate`, which orders the writes before them);
/// `memory`, `readyWaiters` and `fillError` live in `state`.
public final class LiveMemorySink: PageSink, @unchecked Sendable {
    public let options: LiveMemoryOptions
    /// Pre-copy pages, staged until Finalize: a userfaultfd page can be
    /// installed only once, and pre-copy may send a page many times.
    private var staged: PageSlots
    /// Pages staged clean at Finalize, in runs, for the local fill.
    private var cleanRuns: [AddressRange] = []
    /// Pages installed (or staged) as holes: SIGBUS in this memory, zeros
    /// in its checksum, as the seeder hashes them.
    let holes = HolePages()
    private(set) var activeMemory: MissingFaultMemory?
    let priority = UrgentPages()

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
        do {
            // Not forkable: the post-copy guardian is a fork of this process
            // (FaultGuardian.swift), and copying the page tables of gigabytes of
            // staged pages would delay the hand-over; the guardian never reads them.
            staged = try PageSlots(memoryBytes: options.stagingReserve, spillPath: nil, forkable: false)
        } catch {
            throw MigrationError.image("cannot reserve \(options.stagingReserve >> 30) GiB of address space to stage pages: "
                                       + "\(error); lower LiveMemoryOptions.stagingReserve")
        }
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
            do {
                // SAFETY: the page's bytes lie inside `data`, which covers `range`.
                try staged.store(page, data: data.baseAddress! + Int(page - range.start))
            } catch is PageSlots.Exhausted {
                throw MigrationError.image("more pages than the staging reserve holds; raise LiveMemoryOptions.stagingReserve")
            }
            page += pageSize
        }
    }

    public func storeHole(_ range: AddressRange) throws {
        holes.insert(range)
        if let memory = activeMemory {
            memory.installHole(range)
            return
        }
        for page in stride(from: range.start, to: range.end, by: Int(pageSize)) { staged.mark(page, .hole) }
    }

    public func storeZero(_ range: AddressRange) throws {
        holes.backed(range)
        if let memory = activeMemory {
            try memory.installZero(range)
            return
        }
        for page in stride(from: range.start, to: range.end, by: Int(pageSize)) { staged.mark(page, .zero) }
    }

    // MARK: - Hand-over

    /// Called by the leecher right after Finalize: maps the final layout's
    /// migrated regions, starts fault handling and the local fill of the
    /// `clean` pages (held, and not written since), and hands the memory out.
    /// Hugetlb regions are mapped with huge pages of their size, from this
    /// host's pool.
    func activate(layout: [Region], clean: [AddressRange]) throws {
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
        let thread = try startThread(for: "the post-copy local fill") { [self] in
            // The background fill yields the CPU to whatever serves a touched
            // page: on a small host they compete for the same cores.
            lowerCurrentThreadPriority()
            var failure: String? = nil
            for run in cleanRuns {
                var start = run.start
                while start < run.end {
                    let end = min(run.end, start + UInt64(options.fillBatchPages) * pageSize)
                    do {
                        // A run held clean is staged whole: anything else is a bug, not a page to fetch.
                        guard try installStaged(AddressRange(start: start, end: end), into: memory) else {
                            failure = "pages \(AddressRange(start: start, end: end)) held clean were not staged"
                            break
                        }
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
        pthread_detach(thread)
        let waiters = state.withLock { s in
            s.memory = memory
            defer { s.readyWaiters.removeAll() }
            return s.readyWaiters
        }
        for waiter in waiters { waiter.resume(returning: memory) }
    }

    /// Installs the staged pages of `range` that were held clean; returns
    /// false when a page of it was not (it must be fetched instead).
    private func installStaged(_ range: AddressRange, into memory: MissingFaultMemory) throws -> Bool {
        guard heldClean(range) else { return false }
        // Runs of data slots that are consecutive in the arena are one install;
        // zero pages one zero-page install.
        var page = range.start
        while page < range.end {
            guard let entry = staged.entry(page) else { return false }
            var end = page + pageSize
            switch entry.content {
            case .zero:
                while end < range.end, staged.entry(end)?.content == .zero { end += pageSize }
                try memory.installZero(AddressRange(start: page, end: end))
            case .hole:
                while end < range.end, staged.entry(end)?.content == .hole { end += pageSize }
                memory.installHole(AddressRange(start: page, end: end))
            case .data:
                var next = entry.slot + 1
                while end < range.end, let e = staged.entry(end), e.content == .data, e.slot == next {
                    end += pageSize
                    next += 1
                }
                // SAFETY: memory slots slot..<next are consecutive pages of the
                // reservation (no spill file here), written before activation.
                let bytes = UnsafeRawBufferPointer(start: staged.address(ofSlot: entry.slot), count: Int(end - page))
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
        var low = Ranges.firstIndex(in: cleanRuns, endingAfter: range.start) { $0.end }
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
        guard let run = Ranges.index(in: cleanRuns, containing: range.start, range: { $0 }) else { return false }
        return range.end <= cleanRuns[run].end
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

    /// The migration failed: waiting consumers get the error, touched and
    /// future touches of missing pages get SIGBUS rather than wrong data.
    public func fail(_ reason: String) {
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

extension LiveMemorySink: Destination {
    func check(layout: [Region]) throws { try Self.checkHugePages(layout) }

    public func sourceFrozen(layout: [Region], clean: [AddressRange]) throws {
        try activate(layout: layout, clean: clean)
    }

    var urgentPages: UrgentPages? { priority }

    func complete(layout: [Region], sourcePid: Int32, sourceHost: String, tracker: String,
                  downtimeMilliseconds: Double) async throws -> Manifest {
        try await waitForLocalFill()
        return Manifest(sourcePid: sourcePid, sourceHost: sourceHost, tracker: tracker, created: "",
                        downtimeMilliseconds: downtimeMilliseconds, regions: try manifestRegions(layout: layout))
    }

    func commit() { finish() }
}
