// `leecher pull --restore` (issue 13, Protocols/criu.md § 4): the pages go to
// a store in this process's memory instead of an image; at Finalize the
// leecher fetches CRIU's images, serves CRIU's lazy-pages daemon from the
// store on loopback, and runs `criu restore --lazy-pages`. The restored
// process runs at once; a page it touches is asked for by the daemon, and a
// page the store does not hold yet is fetched from the seeder first, ahead of
// the background fill. Complete (CRIU then kills the source) waits until the
// process is restored and the store holds every page.
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
    private struct Running { var server: LazyPageServer?; var lazyPages: CriuRun?; var frozenAt: ContinuousClock.Instant? }
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

    /// Before the migration: our page server, listening.
    public func prepare() throws {
        let server = try LazyPageServer(provider: store, timeout: max(grace, .seconds(30)))
        try server.start()
        running.withLock { $0.server = server }
    }

    /// Right after Finalize, before post-copy takes the link: CRIU's images,
    /// then CRIU's lazy-pages daemon (it reads the images as it starts).
    func receiveImages(link: SessionLink) async throws {
        let frozenAt = ContinuousClock.now
        running.withLock { $0.frozenAt = frozenAt }
        let (criu, directory, grace) = (self.criu, self.directory, self.grace)
        do {
            guard let server = running.withLock({ $0.server }) else { throw CriuError.badImages("the page server is not running") }
            let bundle = try await link.callExtra(CriuMethod.images, [], limit: CriuImages.maxBundleBytes)
            let names = try CriuImages.unpack(bundle, into: directory)
            let lazy = try CriuImages.lazyRanges(directory: directory)
            guard lazy.count <= 1 else {
                throw CriuError.badImages("the dump holds \(lazy.count) processes; Ferry migrates the memory of one")
            }
            server.setLazy(lazy)
            events(.imagesReceived(bytes: bundle.count, files: names.count, lazyPages: server.lazyPages))
            try await runOnDedicatedThread(for: "criu lazy-pages") { [self] in
                let daemon = try CriuRun(criu, "lazy-pages", ["--page-server", "--address", "127.0.0.1", "--port", "\(server.port)"],
                                         directory: directory, log: directory + "/lazy-pages.log", statusFD: true)
                running.withLock { $0.lazyPages = daemon }
                guard daemon.waitReady(timeout: grace) else {
                    daemon.terminate()
                    throw CriuError.failed(step: "lazy-pages", status: -1, log: daemon.log, tail: Criu.logTail(daemon.log))
                }
            }
        } catch {
            throw CriuStepFailed("\(error); the migration is aborted, so CRIU resumes the source, which runs on")
        }
    }

    /// Beside post-copy: `criu restore --lazy-pages`, detached.
    func restoreProcess() async throws {
        let (criu, directory, grace) = (self.criu, self.directory, self.grace)
        let (server, daemon, frozenAt) = running.withLock { ($0.server, $0.lazyPages, $0.frozenAt ?? .now) }
        let pid: Int32?
        do {
            pid = try await runOnDedicatedThread(for: "criu restore") { () throws -> Int32? in
                let pidfile = directory + "/restored.pid"
                let restore = try CriuRun(criu, "restore", ["--lazy-pages", "--restore-detached", "--pidfile", pidfile],
                                          directory: directory, log: directory + "/restore.log")
                do {
                    try restore.wait(timeout: grace + .seconds(60))
                } catch {
                    daemon?.terminate()
                    // Our side of the page server failing is the likelier story.
                    if let failure = server?.failure { throw CriuError.protocolViolation("serving CRIU's lazy pages: \(failure)") }
                    throw error
                }
                let text = try? String(contentsOfFile: pidfile, encoding: .utf8)
                return text.flatMap { Int32($0.trimmingCharacters(in: .whitespacesAndNewlines)) }
            }
        } catch {
            throw CriuStepFailed("\(error); the migration is aborted, so CRIU resumes the source, which runs on")
        }
        events(.restored(pid: pid, afterFinalize: ContinuousClock.now - frozenAt))
    }

    /// After Complete: waits (at most `timeout`) until the lazy-pages daemon
    /// has every lazy page and exits; reports when the last one was sent.
    public func waitEveryPage(timeout: Duration) async throws {
        let (server, daemon, frozenAt) = running.withLock { ($0.server, $0.lazyPages, $0.frozenAt) }
        guard let server, let daemon, let frozenAt else { return }
        try await runOnDedicatedThread(for: "criu lazy-pages") {
            try daemon.wait(timeout: timeout)
        }
        if let failure = server.failure { throw CriuError.protocolViolation(failure) }
        if let last = server.everyPageSent {
            events(.everyPageSent(pages: server.pagesServed, afterFinalize: last - frozenAt))
        } else if server.lazyPages == 0 {
            events(.everyPageSent(pages: 0, afterFinalize: ContinuousClock.now - frozenAt))
        }
    }

    /// The migration failed: stop the daemon (the restored process, if any, is left alone).
    public func cancel() {
        running.withLock { $0.lazyPages }?.terminate()
    }
}

/// The pages of the migrated process, in this process's memory: what the
/// lazy page server answers CRIU with. Pages held before the freeze count
/// only if Finalize found them clean.
final class CriuPageStore: PageSink, LazyPageProvider, Sendable {
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

    /// A request waits only for its first page (see `copy`): that one
    /// jumps the queue when it is not held; post-copy fetches the rest in bulk.
    func want(address: UInt64, pages: Int) {
        let missing = state.withLock { s -> Bool in
            guard let i = Self.index(s.areas, address) else { return false }
            return !s.areas[i].isHeld(Int((address - s.areas[i].range.start) / pageSize))
        }
        if missing { touches.push(address) }
    }

    func copy(address: UInt64, pages: Int, into buffer: UnsafeMutableRawBufferPointer, timeout: Duration) throws -> Int {
        let first = AddressRange(start: address, end: address + pageSize)
        let copied = state.wait(until: { s in
            guard s.frozen, let i = Self.index(s.areas, address) else { return s.frozen }
            return s.areas[i].isHeld(Int((address - s.areas[i].range.start) / pageSize))
        }, timeout: timeout) { s -> Int in
            guard let i = Self.index(s.areas, address) else { return 0 }
            let area = s.areas[i]
            let start = Int((address - area.range.start) / pageSize)
            var count = 0
            while count < pages, start + count < Int(area.range.pageCount), area.isHeld(start + count) { count += 1 }
            let offset = start * Int(pageSize)
            buffer.baseAddress!.copyMemory(from: area.memory + offset, byteCount: count * Int(pageSize))
            return count
        }
        guard let copied else {
            throw CriuError.timedOut(step: "lazy-pages (the page at \(first) did not arrive)", seconds: timeout.inSeconds, log: "")
        }
        guard copied > 0 else {
            throw CriuError.protocolViolation("CRIU asked for the page at \(first), which Ferry does not migrate; not making it up")
        }
        return copied
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
