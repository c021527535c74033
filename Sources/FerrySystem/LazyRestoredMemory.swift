// The memory of a process CRIU restored with lazy pages, filled by us.
//
// Why: `criu restore --lazy-pages` maps the process's private anonymous
// memory empty, registers it for missing faults on a userfaultfd, and hands
// that descriptor to a lazy-pages daemon (Protocols/criu.md § 4). CRIU's own
// daemon fetches one page per fault and fills in the background only while
// no fault waits, so a process writing at random stays slow for minutes.
// Ferry already holds the pages (pre-copied, plus the dirty set), so Ferry is
// the daemon: it installs them with UFFDIO_COPY in runs of up to 1 MiB,
// touched pages first: for 1 GiB every page is local half a second to two
// seconds after the freeze (docs/benchmarks-criu.md).
//
// Touched pages are installed from the handoff on; the background fill
// waits until restore says it has finished (`restoreFinished`), when every
// mapping is in place and registered, as CRIU's daemon does.
//
// What is filled: exactly the pages CRIU marked lazy (PE_LAZY), each from
// the store at its source ("image") address, which is where CRIU maps it
// too until the process moves it. A touch of a registered page that was
// never lazy (memory the source had never used) gets the zero page, as in
// CRIU's daemon. A touched page the store does not hold yet (dirty at the
// freeze, still on its way) is asked for at once (`LazyPageSupply.want`),
// installed when it arrives, and poisoned if it does not arrive within the
// fault timeout: the toucher gets SIGBUS, never zeros.
//
// The process keeps running meanwhile, and CRIU asks for the events that
// change its memory, which block the process until read:
//   fork    the child's memory is on a new descriptor, with the pages still
//           missing at the fork missing there too: a second handler fills
//           it the same way (a child of this object).
//   remap   (mremap) pages still missing move with their range.
//   remove  (MADV_DONTNEED) pages still missing are dropped, since the
//           program threw them away, and the range is unregistered, as
//           CRIU's daemon does, so the kernel zero-fills it from now on.
//   unmap   pages still missing are dropped.
// The kernel refuses installs (EAGAIN) while such an event is unread, so the
// one handler thread reads events between installs.
//
// If the leecher dies before every page is in, a guardian process holding a
// second copy of the descriptor poisons what is missing (FaultGuardian.swift),
// instead of the kernel dropping the registration and the process reading
// zeros. When every page is in, the guardian is dismissed and the descriptor
// closed: the memory is the process's own.
//
// Kernel: missing-mode userfaultfd with the fork/remap/remove/unmap events
// 4.11+ (CRIU checks them), UFFDIO_POISON 6.6+.
#if canImport(Glibc)
import Glibc
#endif
internal import CFerryLinux
import FerryToolkit
import Synchronization

/// Where the pages of a lazily restored process come from (Ferry's store).
public protocol LazyPageSupply: AnyObject, Sendable {
    /// Runs `body` with the bytes of the run of pages held from source
    /// address `image` on (at most `pages`, at least 1), under whatever lock
    /// keeps them still; nil when the page at `image` is not held (yet).
    func withHeldPages<T>(from image: UInt64, upTo pages: Int, _ body: (UnsafeRawPointer, Int) throws -> T) rethrows -> T?
    /// How many pages from source address `image` on (at most `pages`) are
    /// not held: the background fill steps over them at once.
    func pagesNotHeld(from image: UInt64, upTo pages: Int) -> Int
    /// The page at source address `image` is touched and not held: fetch it first.
    func want(_ image: UInt64)
}

public final class LazyRestoredMemory: Sendable {
    /// Counters for events, tests and benchmarks.
    public struct Statistics: Sendable, Equatable {
        /// Lazy pages the process was given, in all; installed; dropped
        /// (removed or unmapped by the process before they were installed).
        public var lazyPages = 0
        public var pagesCopied = 0
        public var pagesDropped = 0
        /// Touches of never-lazy pages answered with the zero page.
        public var zeroPages = 0
        /// Fault messages; faults on pages the store did not hold yet.
        public var faults = 0
        public var faultsWaited = 0
        public var pagesPoisoned = 0
        /// UFFDIO_COPY calls; children followed through fork.
        public var copyCalls = 0
        public var forks = 0
    }

    /// One run of lazy pages as CRIU listed them: where it is now in the
    /// process, where it was at the source, and which pages are still missing.
    struct Area {
        var start: UInt64
        var image: UInt64
        let pages: Int
        var missing: [UInt64]
        var left: Int
        var end: UInt64 { start + UInt64(pages) * pageSize }

        init(start: UInt64, image: UInt64, pages: Int, allMissing: Bool) {
            (self.start, self.image, self.pages) = (start, image, pages)
            missing = Array(repeating: allMissing ? ~0 : 0, count: (pages + 63) / 64)
            if allMissing, pages % 64 != 0 { missing[missing.count - 1] = (1 << UInt64(pages % 64)) - 1 }
            left = allMissing ? pages : 0
        }

        func isMissing(_ page: Int) -> Bool { missing[page >> 6] & (1 << UInt64(page & 63)) != 0 }
        mutating func clear(_ page: Int) {
            guard isMissing(page) else { return }
            missing[page >> 6] &= ~(1 << UInt64(page & 63))
            left -= 1
        }
        mutating func set(_ page: Int) {
            guard !isMissing(page) else { return }
            missing[page >> 6] |= 1 << UInt64(page & 63)
            left += 1
        }
        /// The first missing page at or after `page`, nil if none.
        func nextMissing(from page: Int) -> Int? {
            var word = page >> 6
            guard word < missing.count else { return nil }
            var bits = missing[word] & (~0 << UInt64(page & 63))
            while true {
                if bits != 0 { return word * 64 + bits.trailingZeroBitCount }
                word += 1
                guard word < missing.count else { return nil }
                bits = missing[word]
            }
        }
    }

    /// Everything the handler thread changes that others read.
    struct Shared {
        var stats = Statistics()
        var finished: ContinuousClock.Instant?
        var failure: String?
        var exited = false
        var children: [LazyRestoredMemory] = []
        var handler: pthread_t?
        /// Set by `restoreFinished`: the background fill may run.
        var mayFill = false
    }

    /// Names the process in errors and thread names: "restored pid 57".
    public let owner: String
    let uffd: Userfaultfd
    let supply: any LazyPageSupply
    let faultTimeout: Duration
    let guardian: FaultGuardian?
    let stopPipe: StopPipe
    /// The areas: touched only by the handler thread (and before it starts).
    private let areas: Mutex<[Area]>
    private let shared = Mutex(Shared())

    /// Takes ownership of `descriptor`, a userfaultfd on which CRIU
    /// registered the restored process's lazy memory; `lazy` are the
    /// entries CRIU marked PE_LAZY (source addresses, page counts).
    /// `guarded`: start a guardian (off only in tests of the guardian's absence).
    public convenience init(adopting descriptor: Int32, owner: String, lazy: [(start: UInt64, pages: UInt64)],
                            supply: any LazyPageSupply, faultTimeout: Duration, guarded: Bool = true) throws {
        let areas = lazy.filter { $0.pages > 0 }.sorted { $0.start < $1.start }
            .map { Area(start: $0.start, image: $0.start, pages: Int($0.pages), allMissing: true) }
        try self.init(uffd: Userfaultfd(adopting: descriptor, target: owner), owner: owner, areas: areas,
                      supply: supply, faultTimeout: faultTimeout, guarded: guarded)
    }

    private init(uffd: Userfaultfd, owner: String, areas: [Area], supply: any LazyPageSupply,
                 faultTimeout: Duration, guarded: Bool) throws {
        self.uffd = uffd
        self.owner = owner
        self.supply = supply
        self.faultTimeout = faultTimeout
        self.areas = Mutex(areas)
        stopPipe = try StopPipe(for: "the lazy pages of \(owner)")
        guardian = guarded ? try FaultGuardian.spawn(holding: uffd, ranges: areas.map {
            (AddressRange(start: $0.start, end: $0.end), pageSize: FerrySystem.pageSize)
        }) : nil
        shared.withLock { $0.stats.lazyPages = areas.reduce(0) { $0 + $1.left } }
    }

    deinit {
        stop()
        if shared.withLock({ $0.finished == nil }) { fail("the lazy-pages handler was dropped before every page arrived") }
        uffd.close()
        guardian?.dismiss()
        stopPipe.close()
    }

    // MARK: - Running

    /// Starts the handler thread; it ends by itself once every lazy page is
    /// in (or dropped), or when the process exits.
    public func start() throws {
        try shared.withLock { shared in
            guard shared.handler == nil else { return }
            shared.handler = try startThread(for: "the lazy pages of \(owner)") { [self] in run() }
        }
    }

    /// CRIU has finished restoring (its 0x52535446 on the socket): every
    /// area is registered at its place, so the background fill may start.
    /// Until then only touched pages are installed: restore hands the
    /// descriptor over before its restorer has moved each mapping into
    /// place and registered it, and an install into a range not registered
    /// yet fails as if the process had dropped it (ENOENT), which would
    /// leave the page to the kernel's zeros once the descriptor closes.
    /// CRIU's own daemon waits for the same message.
    public func restoreFinished() {
        shared.withLock { $0.mayFill = true }
    }

    /// Stops the handler thread (and the children's); pages still missing
    /// stay registered, so a touch blocks until `fail` poisons them.
    public func stop() {
        let (thread, children) = shared.withLock { shared in
            defer { shared.handler = nil }
            return (shared.handler, shared.children)
        }
        for child in children { child.stop() }
        if let thread { stopPipe.stop(joining: thread) }
    }

    /// Gives up: stops the handler and poisons every page still missing,
    /// here and in the children, so the process gets SIGBUS, not zeros.
    public func fail(_ reason: String) {
        stop()
        let children = shared.withLock { $0.children }
        for child in children { child.fail(reason) }
        poisonEverything(because: reason)
    }

    private func poisonEverything(because reason: String) {
        shared.withLock { shared in if shared.failure == nil { shared.failure = reason } }
        let poisoned = areas.withLock { areas in
            var count = 0
            for index in areas.indices { count += poisonMissing(&areas[index]) }
            return count
        }
        shared.withLock { $0.stats.pagesPoisoned += poisoned }
    }

    /// True once the process exited before every page was in (nothing failed: nobody is left to read them).
    public var exited: Bool { shared.withLock { $0.exited } }

    /// True once this process and every child it forked hold all their
    /// lazy pages (none poisoned).
    public var isComplete: Bool {
        let (done, children) = shared.withLock { ($0.finished != nil && $0.failure == nil, $0.children) }
        return done && children.allSatisfy(\.isComplete)
    }

    /// When the last page was installed (the latest over the children).
    public var finishedAt: ContinuousClock.Instant? {
        let (finished, children) = shared.withLock { ($0.finished, $0.children) }
        guard var latest = finished else { return nil }
        for child in children {
            guard let theirs = child.finishedAt else { return nil }
            latest = max(latest, theirs)
        }
        return latest
    }

    /// Summed over this process and its children.
    public var statistics: Statistics {
        let (mine, children) = shared.withLock { ($0.stats, $0.children) }
        return children.map(\.statistics).reduce(mine) { sum, child in
            var sum = sum
            sum.pagesCopied += child.pagesCopied
            sum.pagesDropped += child.pagesDropped
            sum.zeroPages += child.zeroPages
            sum.faults += child.faults
            sum.faultsWaited += child.faultsWaited
            sum.pagesPoisoned += child.pagesPoisoned
            sum.copyCalls += child.copyCalls
            sum.forks += child.forks
            return sum
        }
    }

    /// The first failure here or in a child.
    public var failure: String? {
        let (mine, children) = shared.withLock { ($0.failure, $0.children) }
        return mine ?? children.lazy.compactMap(\.failure).first
    }

    // MARK: - The handler thread

    /// Pages a fault installs at once when they are held: the touched one and the next.
    static let faultRun = 16
    /// Pages one background install takes (1 MiB), and one step between
    /// looks at the descriptor (8 MiB: about a millisecond).
    static let fillRun = 256
    static let fillBudget = 2048

    /// Touched pages not resolved yet, by address in the process: their
    /// source address (nil: a never-lazy page wanting the zero page) and
    /// the first touch's time.
    private struct Waiting { var image: UInt64?; var since: ContinuousClock.Instant }

    private func run() {
        var waiting: [UInt64: Waiting] = [:]
        var cursor = (area: 0, page: 0)
        let ended: Result<Bool, any Error> = Result {
            try uffd.withDescriptor { fd in try loop(fd: fd, waiting: &waiting, cursor: &cursor) }
        }
        switch ended {
        case .success(false):
            return  // stopped: `stop` or `fail` goes on from here
        case .success(true):
            finish(exited: false)
        case .failure(is Exited):
            finish(exited: true)
        case .failure(let error):
            poisonEverything(because: "the lazy-pages handler of \(owner) stopped: \(error)")
        }
    }

    /// Reads events, serves faults and fills until every page is in (true)
    /// or the stop pipe says stop (false).
    private func loop(fd: Int32, waiting: inout [UInt64: Waiting], cursor: inout (area: Int, page: Int)) throws -> Bool {
        var events: [UserfaultfdEvent] = []
        events.reserveCapacity(64)
        var fds = [pollfd(fd: fd, events: Int16(POLLIN), revents: 0), pollfd(fd: stopPipe.read, events: Int16(POLLIN), revents: 0)]
        var idle = false
        while true {
            let left = areas.withLock { $0.reduce(0) { $0 + $1.left } }
            if left == 0 && waiting.isEmpty { return true }
            // Filling: look at the descriptor without waiting. Waiting for
            // pages on their way: every millisecond. Waiting for restore to
            // finish: every 5. Else until a fault.
            let mayFill = shared.withLock { $0.mayFill }
            let timeout: Int32 = mayFill && !idle ? 0 : !waiting.isEmpty ? 1 : !mayFill ? 5 : left == 0 ? -1 : 1
            try checkedCall("poll userfaultfd", on: owner) { poll(&fds, 2, timeout) }
            if fds[1].revents != 0 { return false }
            if fds[0].revents & Int16(POLLERR | POLLHUP) != 0 { throw Exited() }
            if fds[0].revents != 0 {
                events.removeAll(keepingCapacity: true)
                try uffd.readEvents(into: &events)
                try handle(events, fd: fd, waiting: &waiting)
            }
            try serve(&waiting, fd: fd)
            if mayFill { idle = try !fillSome(fd: fd, cursor: &cursor) }
        }
    }

    /// The process's memory is gone (ESRCH/ENOSPC from an install, or a hang-up).
    private struct Exited: Error {}

    private func finish(exited: Bool) {
        shared.withLock { shared in
            if shared.finished == nil { shared.finished = .now }
            shared.exited = exited
        }
        // Every page is in: the registration has nothing left to do.
        guardian?.dismiss()
        uffd.close()
    }

    private func handle(_ events: [UserfaultfdEvent], fd: Int32, waiting: inout [UInt64: Waiting]) throws {
        for event in events {
            switch event {
            case .pageFault(let address, _):
                shared.withLock { $0.stats.faults += 1 }
                try touched(address, fd: fd, waiting: &waiting)
            case .remove(let range):
                // As CRIU's daemon: unregister, so later touches get fresh zero pages.
                do { try uffd.unregister(range) } catch let error as SystemError where error.errno == ENOMEM { throw Exited() }
                drop(range, waiting: &waiting)
            case .unmap(let range):
                drop(range, waiting: &waiting)
            case .remap(let from, let to, let length):
                remap(from: from, to: to, length: length, waiting: &waiting)
            case .fork(let child):
                try follow(child)
            case .other:
                break
            }
        }
    }

    /// A fault at `address`: install it (and what follows, if held), zero it
    /// if it was never lazy, or ask for it and wait.
    private func touched(_ address: UInt64, fd: Int32, waiting: inout [UInt64: Waiting]) throws {
        guard waiting[address] == nil else { return }
        let found: (image: UInt64, missing: Bool)? = areas.withLock { areas in
            guard let (a, page) = locate(address, in: areas) else { return nil }
            return (areas[a].image + UInt64(page) * pageSize, areas[a].isMissing(page))
        }
        guard let found else {
            if try !zero(address, fd: fd) { waiting[address] = Waiting(image: nil, since: .now) }
            return
        }
        // Installed meanwhile: the install woke the toucher.
        guard found.missing else { try? uffd.wake(AddressRange(start: address, end: address + pageSize)); return }
        switch try install(at: address, image: found.image, upTo: Self.faultRun, fd: fd) {
        case nil:
            waiting[address] = Waiting(image: found.image, since: .now)
            shared.withLock { $0.stats.faultsWaited += 1 }
            supply.want(found.image)
        case 0?:
            waiting[address] = Waiting(image: found.image, since: .now)  // the map is changing: again after its event
        default:
            break
        }
    }

    /// Installs waiting pages that arrived; poisons those waiting too long.
    private func serve(_ waiting: inout [UInt64: Waiting], fd: Int32) throws {
        guard !waiting.isEmpty else { return }
        let now = ContinuousClock.now
        for (address, wait) in waiting {
            guard let image = wait.image else {
                if try zero(address, fd: fd) { waiting[address] = nil }
                continue
            }
            let still = areas.withLock { areas in locate(address, in: areas).map { areas[$0.0].isMissing($0.1) } ?? false }
            if !still {
                waiting[address] = nil
                try? uffd.wake(AddressRange(start: address, end: address + pageSize))
            } else if let settled = try install(at: address, image: image, upTo: Self.faultRun, fd: fd), settled > 0 {
                waiting[address] = nil
            } else if now - wait.since >= faultTimeout {
                // Said before the poison: the toucher learns of it at once.
                shared.withLock { shared in
                    if shared.failure == nil {
                        shared.failure = "the page at 0x\(String(image, radix: 16)) of \(owner) did not arrive within "
                            + "\(faultTimeout.inSeconds) s of its first touch; the process got SIGBUS there"
                    }
                }
                let poisoned = areas.withLock { areas -> Int in
                    guard let (a, page) = locate(address, in: areas) else { return 0 }
                    return poisonPage(&areas[a], page)
                }
                waiting[address] = nil
                shared.withLock { $0.stats.pagesPoisoned += poisoned }
            }
        }
    }

    /// One background step: installs up to `fillBudget` pages from the
    /// cursor on, stepping past pages not held yet (a later pass retries
    /// them). False when it installed nothing (everything left is on its
    /// way, or the map is changing and its event must be read first).
    private func fillSome(fd: Int32, cursor: inout (area: Int, page: Int)) throws -> Bool {
        var budget = Self.fillBudget
        var progressed = false
        var wrapped = false
        while budget > 0 {
            let next: (area: Int, page: Int, address: UInt64, image: UInt64, run: Int)? = areas.withLock { areas in
                while cursor.area < areas.count {
                    let area = areas[cursor.area]
                    if area.left > 0, let page = area.nextMissing(from: cursor.page) {
                        var run = 1
                        while run < Self.fillRun, page + run < area.pages, area.isMissing(page + run) { run += 1 }
                        return (cursor.area, page, area.start + UInt64(page) * pageSize, area.image + UInt64(page) * pageSize, run)
                    }
                    cursor = (cursor.area + 1, 0)
                }
                return nil
            }
            guard let next else {
                cursor = (0, 0)
                if wrapped { return progressed }
                wrapped = true
                continue
            }
            switch try install(at: next.address, image: next.image, upTo: next.run, fd: fd) {
            case nil:
                budget -= 1  // not held yet: step over the run on its way
                cursor = (next.area, next.page + max(1, supply.pagesNotHeld(from: next.image, upTo: next.run)))
            case 0?:
                return progressed  // the map is changing: read its event first
            case let settled?:
                progressed = true
                budget -= settled
                cursor = (next.area, next.page + settled)
            }
        }
        return progressed
    }

    /// Installs the held pages from `address` (source address `image`), at
    /// most `upTo` and only missing ones. Returns how many pages it settled
    /// (installed, or found present), 0 when the kernel asks to read events
    /// first (EAGAIN), nil when the store does not hold the first page.
    private func install(at address: UInt64, image: UInt64, upTo count: Int, fd: Int32) throws -> Int? {
        // Only a run of pages still missing, within one area.
        let run = areas.withLock { areas -> Int in
            guard let (a, page) = locate(address, in: areas) else { return 0 }
            var run = 0
            while run < count, page + run < areas[a].pages, areas[a].isMissing(page + run) { run += 1 }
            return run
        }
        guard run > 0 else { return 1 }
        let result: (settled: Int, errno: Int32)? = supply.withHeldPages(from: image, upTo: run) { bytes, held in
            // One UFFDIO_COPY stays inside one VMA (else ENOENT, copying
            // nothing), and an area need not: CRIU merges lazy pages of
            // adjacent VMAs into one pagemap entry (a thread's stack and the
            // mapping after it), and the process may split a VMA since
            // (mprotect). So an ENOENT is halved down to the one page, and
            // only the one page's ENOENT means it is not registered any more.
            var pages = held
            while true {
                var copy = uffdio_copy(dst: address, src: UInt64(UInt(bitPattern: bytes)), len: UInt64(pages) * pageSize, mode: 0, copy: 0)
                // SAFETY: `src` points at `held` >= `pages` pages the supply keeps
                // still during this call; `dst` is in memory CRIU registered on this descriptor.
                let status = ferry_uffdio_copy(fd, &copy)
                let error = status < 0 ? errno : 0
                let copied = copy.copy > 0 ? Int(copy.copy / Int64(pageSize)) : 0
                switch error {
                case 0: return (pages, 0)
                case EEXIST: return (copied + 1, 0)  // present already: settled, not by us
                case ENOENT where copied == 0 && pages > 1: pages /= 2
                default: return (copied, error)
                }
            }
        }
        guard var result else { return nil }
        var dropped = 0
        if result.errno == ENOENT && result.settled == 0 {
            // Not registered any more: the process unmapped or emptied it
            // (its event may still be on its way). Nothing to fill there.
            (result.settled, dropped) = (1, 1)
        }
        areas.withLock { areas in
            guard let (a, page) = locate(address, in: areas) else { return }
            for offset in 0..<result.settled where page + offset < areas[a].pages { areas[a].clear(page + offset) }
        }
        shared.withLock { shared in
            shared.stats.copyCalls += 1
            shared.stats.pagesCopied += result.settled - dropped
            shared.stats.pagesDropped += dropped
        }
        switch result.errno {
        case 0, EAGAIN, ENOENT: return result.settled  // 0: the map is changing, read its event first
        case ESRCH, ENOSPC: throw Exited()
        default:
            throw SystemError(operation: "UFFDIO_COPY", target: "\(owner) at 0x\(String(address, radix: 16))", errno: result.errno)
        }
    }

    /// The zero page for a touched page that was never lazy; false when
    /// the map is changing and it must be tried again after the event.
    private func zero(_ address: UInt64, fd: Int32) throws -> Bool {
        var request = uffdio_zeropage(range: uffdio_range(start: address, len: pageSize), mode: 0, zeropage: 0)
        // SAFETY: one page of memory registered on this descriptor; the kernel writes only `zeropage`.
        if ferry_uffdio_zeropage(fd, &request) < 0 {
            switch errno {
            case EEXIST: try? uffd.wake(AddressRange(start: address, end: address + pageSize))
            case EAGAIN: return false
            case ENOENT: break  // no longer registered: the toucher's next fault is the kernel's
            case ESRCH, ENOSPC: throw Exited()
            default: throw SystemError(operation: "UFFDIO_ZEROPAGE", target: "\(owner) at 0x\(String(address, radix: 16))", errno: errno)
            }
        } else {
            shared.withLock { $0.stats.zeroPages += 1 }
        }
        return true
    }

    /// The process dropped `range` (unmap, MADV_DONTNEED): its missing pages need no filling.
    private func drop(_ range: AddressRange, waiting: inout [UInt64: Waiting]) {
        let dropped = areas.withLock { areas in
            var count = 0
            for a in areas.indices where areas[a].start < range.end && range.start < areas[a].end {
                let first = Int((max(range.start, areas[a].start) - areas[a].start) / pageSize)
                let last = Int((min(range.end, areas[a].end) - areas[a].start + pageSize - 1) / pageSize)
                for page in first..<last where areas[a].isMissing(page) { areas[a].clear(page); count += 1 }
            }
            return count
        }
        for address in waiting.keys where range.contains(address) { waiting[address] = nil }
        shared.withLock { $0.stats.pagesDropped += dropped }
    }

    /// mremap moved `length` bytes from `from` to `to`: the missing pages move with them.
    private func remap(from: UInt64, to: UInt64, length: UInt64, waiting: inout [UInt64: Waiting]) {
        let moved = AddressRange(start: from, end: from + length)
        areas.withLock { areas in
            var added: [Area] = []
            for a in areas.indices where areas[a].start < moved.end && moved.start < areas[a].end && areas[a].left > 0 {
                let first = Int((max(moved.start, areas[a].start) - areas[a].start) / pageSize)
                let last = Int((min(moved.end, areas[a].end) - areas[a].start) / pageSize)
                let offset = UInt64(first) * pageSize
                var piece = Area(start: areas[a].start + offset - from + to, image: areas[a].image + offset,
                                 pages: last - first, allMissing: false)
                for page in first..<last where areas[a].isMissing(page) {
                    piece.set(page - first)
                    areas[a].clear(page)
                }
                if piece.left > 0 { added.append(piece) }
            }
            areas = (areas.filter { $0.left > 0 } + added).sorted { $0.start < $1.start }
        }
        var moves: [(UInt64, Waiting)] = []
        for (address, wait) in waiting where moved.contains(address) {
            waiting[address] = nil
            moves.append((address - from + to, wait))
        }
        for (address, wait) in moves { waiting[address] = wait }
    }

    /// fork: a child handler for the new descriptor, with the pages missing now.
    private func follow(_ descriptor: Int32) throws {
        let remaining = areas.withLock { $0.filter { $0.left > 0 } }
        let index = shared.withLock { shared -> Int in
            shared.stats.forks += 1
            return shared.children.count + 1
        }
        let child = try LazyRestoredMemory(uffd: Userfaultfd(adopting: descriptor, target: "\(owner), child \(index)"),
                                           owner: "\(owner), child \(index)", areas: remaining, supply: supply,
                                           faultTimeout: faultTimeout, guarded: guardian != nil)
        child.restoreFinished()  // a fork comes after the restore
        shared.withLock { $0.children.append(child) }
        try child.start()
    }

    // MARK: - Helpers (under the areas' lock)

    /// The area and page holding process address `address` that is still
    /// to be filled, else any area holding it; nil outside every area.
    private func locate(_ address: UInt64, in areas: [Area]) -> (Int, Int)? {
        var found: (Int, Int)? = nil
        for a in areas.indices where address >= areas[a].start && address < areas[a].end {
            let page = Int((address - areas[a].start) / pageSize)
            if areas[a].isMissing(page) { return (a, page) }
            found = found ?? (a, page)
        }
        return found
    }

    private func poisonPage(_ area: inout Area, _ page: Int) -> Int {
        let address = area.start + UInt64(page) * pageSize
        var request = uffdio_poison(range: uffdio_range(start: address, len: pageSize), mode: 0, updated: 0)
        let done = (try? uffd.withDescriptor { fd in ferry_uffdio_poison(fd, &request) }) == 0
        area.clear(page)
        return done ? 1 : 0
    }

    private func poisonMissing(_ area: inout Area) -> Int {
        var count = 0
        var page = 0
        while let next = area.nextMissing(from: page) {
            count += poisonPage(&area, next)
            page = next + 1
        }
        return count
    }
}
