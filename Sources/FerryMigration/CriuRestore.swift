// `leecher pull --restore` (issue 13, Protocols/criu.md § 4): the pages go to
// a store in this process's memory instead of an image; at Finalize the
// leecher fetches CRIU's images and runs `criu restore --lazy-pages`, and is
// itself the lazy-pages daemon: restore hands it the restored process's
// userfaultfd over `lazy-pages.socket`, and Ferry fills the pages CRIU left
// lazy straight from the store (LazyRestoredMemory), touched pages first; a
// touched page the store does not hold yet is fetched from the seeder ahead
// of the rest of post-copy. Complete (CRIU then kills the source) waits until
// the process is restored and the store holds every page.
import Foundation
import FerryCRIU
import FerrySystem
import FerryToolkit
import Synchronization

/// What a whole-process restore reports.
public enum CriuRestoreEvent: Sendable {
    case imagesReceived(bytes: Int, files: Int, lazyPages: UInt64)
    case restored(pid: Int32?, afterFinalize: Duration)
    case everyPageSent(pages: UInt64, afterFinalize: Duration)
}

public final class CriuRestore: Sendable {
    public let criu: Criu
    public let directory: String
    public let grace: Duration
    let store: CriuPageStore
    private let events: @Sendable (CriuRestoreEvent) -> Void
    private struct Running {
        var socket: LazyPagesSocket?
        var connection: LazyPagesSocket.Connection?
        var stopped = false
        /// Lazy pages per pid of the dump (CriuImages.lazyRanges).
        var lazy: [UInt64: [(start: UInt64, pages: UInt64)]] = [:]
        var memories: [LazyRestoredMemory] = []
        var frozenAt: ContinuousClock.Instant?
        var restoredPid: Int32?
    }
    private let running = Mutex(Running())

    /// `directory` receives CRIU's images and logs (created).
    public init(criu: Criu, directory: String, grace: Duration, events: @escaping @Sendable (CriuRestoreEvent) -> Void) throws {
        self.criu = criu
        self.directory = directory
        self.grace = grace
        self.events = events
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        store = CriuPageStore()
    }

    var touches: UrgentPages { store.touches }

    /// Before the migration: the socket restore will hand the process's memory over on.
    public func prepare() throws {
        let socket = try LazyPagesSocket(directory: directory)
        running.withLock { $0.socket = socket }
    }

    /// Right after Finalize, before post-copy takes the link: CRIU's images,
    /// and which pages CRIU left lazy (every one of them in Ferry's store).
    func receiveImages(link: SessionLink) async throws {
        let frozenAt = ContinuousClock.now
        running.withLock { $0.frozenAt = frozenAt }
        do {
            let bundle = try await link.callExtra(CriuMethod.images, [], limit: CriuImages.maxBundleBytes)
            let names = try CriuImages.unpack(bundle, into: directory)
            let lazy = try CriuImages.lazyRanges(directory: directory)
            guard lazy.count <= 1 else {
                throw CriuError.badImages("the dump holds \(lazy.count) processes; Ferry migrates the memory of one")
            }
            for range in lazy.values.joined() {
                let covered = AddressRange(start: range.start, end: range.start + range.pages * pageSize)
                guard store.covers(covered) else {
                    throw CriuError.badImages("CRIU left \(covered) lazy, which is not memory Ferry migrated; not making it up")
                }
            }
            running.withLock { $0.lazy = lazy }
            events(.imagesReceived(bytes: bundle.count, files: names.count, lazyPages: lazy.values.joined().reduce(0) { $0 + $1.pages }))
        } catch {
            throw CriuStepFailed("\(error); the migration is aborted, so CRIU resumes the source, which runs on")
        }
    }

    /// Beside post-copy: `criu restore --lazy-pages`, detached, and the
    /// restored process's memory taken over on the socket as restore hands it.
    func restoreProcess() async throws {
        let (criu, directory, grace) = (self.criu, self.directory, self.grace)
        let frozenAt = running.withLock { $0.frozenAt ?? .now }
        let handoffs = Task { try await runOnDedicatedThread(for: "CRIU's lazy-pages socket") { [self] in try takeHandoffs() } }
        let pid: Int32?
        do {
            pid = try await runOnDedicatedThread(for: "criu restore") { () throws -> Int32? in
                let pidfile = directory + "/restored.pid"
                let restore = try CriuRun(criu, "restore", ["--lazy-pages", "--restore-detached", "--pidfile", pidfile],
                                          directory: directory, log: directory + "/restore.log")
                try restore.wait(timeout: grace + .seconds(60))
                let text = try? String(contentsOfFile: pidfile, encoding: .utf8)
                return text.flatMap { Int32($0.trimmingCharacters(in: .whitespacesAndNewlines)) }
            }
            running.withLock { $0.restoredPid = pid }
            try await handoffs.value
        } catch {
            stopHandoffs()
            throw CriuStepFailed("\(error); the migration is aborted, so CRIU resumes the source, which runs on")
        }
        events(.restored(pid: pid, afterFinalize: ContinuousClock.now - frozenAt))
    }

    /// On a thread of its own: restore's connection, until it closes; each
    /// task's memory starts filling the moment it arrives.
    private func takeHandoffs() throws {
        guard let socket = running.withLock({ $0.socket }) else { throw CriuError.protocolViolation("the lazy-pages socket is not open") }
        let connection = try socket.accept(timeout: grace + .seconds(60)) { running.withLock { $0.stopped } }
        let stopped = running.withLock { running in
            running.connection = connection
            return running.stopped
        }
        if stopped { return }
        while true {
            switch try connection.next() {
            case .memory(let pid, let uffd):
                guard let lazy = running.withLock({ $0.lazy[UInt64(pid)] }) else {
                    close(uffd)
                    throw CriuError.protocolViolation("restore handed over the memory of pid \(pid), which has no pagemap among the images")
                }
                let memory = try LazyRestoredMemory(adopting: uffd, owner: "the restored process (pid \(pid) in its images)",
                                                    lazy: lazy, supply: store, faultTimeout: max(grace, .seconds(30)))
                running.withLock { $0.memories.append(memory) }
                try memory.start()
            case .restoreFinished:
                // Every mapping is in place and registered: fill in the background.
                for memory in running.withLock({ $0.memories }) { memory.restoreFinished() }
            case .zombie:
                continue
            case .closed:
                // Restore is done with the socket (it sends RSTF first; a
                // restore that failed is cancelled, which poisons instead).
                for memory in running.withLock({ $0.memories }) { memory.restoreFinished() }
                return
            }
        }
    }

    private func stopHandoffs() {
        let connection = running.withLock { running in
            running.stopped = true
            return running.connection
        }
        connection?.shutDown()
    }

    /// After Complete: waits (at most `timeout`) until the restored process
    /// holds every lazy page; reports when the last one went in.
    public func waitEveryPage(timeout: Duration) async throws {
        let (memories, frozenAt) = running.withLock { ($0.memories, $0.frozenAt) }
        guard let frozenAt else { return }
        let deadline = ContinuousClock.now + timeout
        while !memories.allSatisfy({ $0.isComplete || $0.failure != nil }) {
            guard ContinuousClock.now < deadline else {
                for memory in memories { memory.fail("not every page was in after \(timeout.inSeconds) s") }
                break
            }
            try await Task.sleep(for: .milliseconds(5))
        }
        if let failure = memories.lazy.compactMap(\.failure).first { throw CriuError.protocolViolation(failure) }
        let pages = memories.reduce(0) { $0 + $1.statistics.pagesCopied }
        let last = memories.compactMap(\.finishedAt).max() ?? .now
        events(.everyPageSent(pages: UInt64(pages), afterFinalize: last - frozenAt))
    }

    /// The migration failed: no more handoffs, and whatever the restored
    /// process still misses raises SIGBUS instead of waiting forever (the
    /// source runs on: CRIU resumes it).
    public func cancel() {
        stopHandoffs()
        for memory in running.withLock({ $0.memories }) { memory.fail("the migration failed") }
    }
}

/// The pages of the migrated process, in this process's memory: what the
/// lazy page server answers CRIU with. Pages held before the freeze count
/// only if Finalize found them clean.
final class CriuPageStore: PageSink, LazyPageSupply, Sendable {
    // Every mutable field is inside `state`, a ConditionLock; the buffers are reached only under it.
    let touches = UrgentPages()

    private final class Area {
        let range: AddressRange
        let memory: UnsafeMutableRawPointer
        var held: [UInt64]
        init(range: AddressRange) throws {
            self.range = range
            guard let pointer = mmap(nil, Int(range.length), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0),
                  pointer != MAP_FAILED else {
                throw SystemError(operation: "mmap", target: "a store for \(range)", errno: errno)
            }
            // Not copied into a fork: the guardian of the restored process's
            // memory is forked while the process waits for its first pages,
            // and copying the page tables of a GiB store would delay them.
            madvise(pointer, Int(range.length), MADV_DONTFORK)
            memory = pointer
            held = [UInt64](repeating: 0, count: Int((range.pageCount + 63) / 64))
        }
        deinit { munmap(memory, Int(range.length)) }
        func isHeld(_ page: Int) -> Bool { held[page >> 6] & (1 << UInt64(page & 63)) != 0 }
        func setHeld(_ page: Int, _ on: Bool) {
            if on { held[page >> 6] |= 1 << UInt64(page & 63) } else { held[page >> 6] &= ~(1 << UInt64(page & 63)) }
        }
    }

    private struct State { var areas: [Area] = []; var frozen = false }
    private let state = ConditionLock(State())

    private static func index(_ areas: [Area], _ address: UInt64) -> Int? {
        Ranges.index(in: areas, containing: address) { $0.range }
    }

    /// Runs `body` for each piece of `range` inside an area (offset in the area, offset in range, length).
    private func pieces(_ areas: [Area], _ range: AddressRange, _ body: (Area, Int, Int, Int) -> Void) {
        var address = range.start
        while address < range.end {
            guard let i = Self.index(areas, address) else { address += pageSize; continue }
            let area = areas[i]
            let end = min(range.end, area.range.end)
            body(area, Int(address - area.range.start), Int(address - range.start), Int(end - address))
            address = end
        }
    }

    private func mark(_ area: Area, from offset: Int, length: Int) {
        for page in stride(from: offset / Int(pageSize), to: (offset + length) / Int(pageSize), by: 1) { area.setHeld(page, true) }
    }

    func store(_ range: AddressRange, data: UnsafeRawBufferPointer) throws {
        state.withLockThenBroadcast { s in
            pieces(s.areas, range) { area, offset, from, length in
                (area.memory + offset).copyMemory(from: data.baseAddress! + from, byteCount: length)
                mark(area, from: offset, length: length)
            }
        }
    }

    func storeZero(_ range: AddressRange) throws {
        state.withLockThenBroadcast { s in
            pieces(s.areas, range) { area, offset, _, length in
                (area.memory + offset).initializeMemory(as: UInt8.self, repeating: 0, count: length)
                mark(area, from: offset, length: length)
            }
        }
    }

    func adopt(layout: [Region]) {
        let wanted = layout.filter { $0.kind == .migrate && !$0.isHugetlb }.map(\.range)
        state.withLockThenBroadcast { s in
            var kept: [Area] = []
            for range in wanted {
                if let old = s.areas.first(where: { $0.range == range }) { kept.append(old); continue }
                guard let area = try? Area(range: range) else { continue }
                // A region that grew, shrank or moved keeps the pages held at
                // addresses it still covers.
                for old in s.areas where old.range.start < range.end && range.start < old.range.end {
                    var address = max(old.range.start, range.start)
                    while address < min(old.range.end, range.end) {
                        let from = Int((address - old.range.start) / pageSize), to = Int((address - range.start) / pageSize)
                        if old.isHeld(from) {
                            (area.memory + to * Int(pageSize)).copyMemory(from: old.memory + from * Int(pageSize), byteCount: Int(pageSize))
                            area.setHeld(to, true)
                        }
                        address += pageSize
                    }
                }
                kept.append(area)
            }
            s.areas = kept.sorted { $0.range.start < $1.range.start }
        }
    }

    func sourceFrozen(layout: [Region], clean: [AddressRange]) {
        adopt(layout: layout)
        state.withLockThenBroadcast { s in
            for area in s.areas { for i in area.held.indices { area.held[i] = 0 } }
            for range in clean {
                pieces(s.areas, range) { area, offset, _, length in mark(area, from: offset, length: length) }
            }
            s.frozen = true
        }
    }

    /// Whether every page of `range` is in an area (memory Ferry migrates).
    func covers(_ range: AddressRange) -> Bool {
        state.withLock { s in
            var address = range.start
            while address < range.end {
                guard let i = Self.index(s.areas, address) else { return false }
                address = s.areas[i].range.end
            }
            return true
        }
    }

    func pagesNotHeld(from image: UInt64, upTo pages: Int) -> Int {
        state.withLock { s in
            guard s.frozen, let i = Self.index(s.areas, image) else { return pages }
            let area = s.areas[i]
            let start = Int((image - area.range.start) / pageSize)
            var count = 0
            while count < pages, start + count < Int(area.range.pageCount), !area.isHeld(start + count) { count += 1 }
            return count
        }
    }

    /// A page the restored process touched and the store lacks: fetch it first.
    func want(_ image: UInt64) {
        touches.push(image)
    }

    /// The run of held pages from `image`, under the store's lock (so
    /// post-copy cannot write them meanwhile); nil before the source froze
    /// (the pre-copied pages may be stale until Finalize's dirty set is
    /// applied) or when the first is not held.
    func withHeldPages<T>(from image: UInt64, upTo pages: Int, _ body: (UnsafeRawPointer, Int) throws -> T) rethrows -> T? {
        try state.withLock { s -> T? in
            guard s.frozen, let i = Self.index(s.areas, image) else { return nil }
            let area = s.areas[i]
            let start = Int((image - area.range.start) / pageSize)
            var count = 0
            while count < pages, start + count < Int(area.range.pageCount), area.isHeld(start + count) { count += 1 }
            guard count > 0 else { return nil }
            return try body(area.memory + start * Int(pageSize), count)
        }
    }
}

/// The third destination (Destination.swift): CRIU's lazy-pages daemon
/// consumes the pages, asking for the ones the restored process touches.
extension CriuPageStore: Destination {
    var urgentPages: UrgentPages? { touches }

    /// The restored process reads its memory through CRIU, so there is no
    /// image to describe; `--restore` turns the checksum comparison off
    /// (the process's own state is the proof: Protocols/criu.md).
    func complete(layout: [Region], sourcePid: Int32, sourceHost: String, tracker: String,
                  downtimeMilliseconds: Double) async throws -> Manifest {
        Manifest(sourcePid: sourcePid, sourceHost: sourceHost, tracker: tracker, created: "",
                 downtimeMilliseconds: downtimeMilliseconds, regions: [])
    }

    func commit() throws {}
}
