// Post-copy memory: regions mapped empty, registered with userfaultfd in
// MISSING mode, and filled page by page while the program already runs on them.
//
// Why: after Finalize the destination must run before the last page arrives.
// A touch of a page that is not there yet blocks the toucher in the kernel and
// queues a fault message; our handler thread hands the page to a callback (the
// leecher, which fetches it with priority) and the toucher is woken by the
// kernel the moment UFFDIO_COPY installs the page (mode 0 wakes). Background
// fill installs everything else in large batches: one UFFDIO_COPY per
// contiguous run of missing pages, UFFDIO_ZEROPAGE for all-zero runs.
//
// Installing twice is impossible by construction: a bitmap of installed
// pages is checked and set under `lock`, around the ioctl, so a page is
// copied at most once however many faults, fetches and fills race for it;
// concurrent faults on one page become one callback. The kernel's EEXIST
// (a page present that we did not install) is counted, never overwritten.
//
// Hugetlb regions (2 MiB and 1 GiB pages) are mapped with MAP_HUGETLB of
// their page size, and the kernel fills them only in whole huge pages:
// UFFDIO_COPY and UFFDIO_POISON take whole, aligned huge pages, and
// UFFDIO_ZEROPAGE not at all (registering a hugetlb range does not offer
// it, and it fails with EINVAL: checked on 6.18). Pages still arrive 4 KiB at a time (the
// protocol's unit), so the 4 KiB pages of a huge page gather in a staging
// buffer of its size (zero filled: zero pages only mark their place), and
// the huge page is installed with one UFFDIO_COPY when the last one has
// arrived. A fault anywhere in a huge page is reported once, at the huge
// page's start, so its whole page is fetched at once; a timeout or a
// failure poisons whole huge pages. The bitmap stays one bit per 4 KiB page;
// the bits of a huge page are set together.
//
// Failure: a page that cannot be fetched must never read as zeros (which is
// what unregistering or closing the descriptor would give). Such pages are
// resolved with UFFDIO_POISON (kernel 6.6+): a poison marker, so the blocked
// toucher is woken and gets SIGBUS (si_code BUS_ADRERR), and so does any later
// touch. This is the per-page form of UFFD_FEATURE_SIGBUS, which cannot be
// used here because it applies to a whole descriptor and suppresses the
// fault messages post-copy depends on. A fault waiting longer than
// `faultTimeout` is poisoned alone; `fail(_:)` poisons every missing page.
// For memory in another process, where our death would otherwise drop the
// registration, a guardian process does the same when we die unasked
// (FaultGuardian.swift).
//
// Kernel: MISSING mode on anonymous memory 4.3+ (hugetlb 4.11+),
// MAP_FIXED_NOREPLACE 4.17+, UFFDIO_POISON 6.6+ (hugetlb included); huge
// pages need free pages of their size in the pool (vm.nr_hugepages, or
// /sys/kernel/mm/hugepages/hugepages-<size>kB/nr_hugepages). Capability:
// none for our own process (user-mode-only descriptors suffice); see
// Userfaultfd.swift for another process.
import FerryToolkit
#if canImport(Glibc)
import Glibc
#endif
internal import CFerryLinux

/// Why post-copy memory could not deliver a page.
public enum MissingFaultMemoryError: Error, CustomStringConvertible, Sendable, Equatable {
    /// A touched page did not arrive within the fault timeout.
    case faultTimedOut(source: UInt64, local: UInt64, seconds: Double)
    /// Post-copy was abandoned; every page not yet installed raises SIGBUS.
    case abandoned(reason: String, pagesPoisoned: Int)
    /// An address outside every mapped region.
    case notMapped(UInt64)

    public var description: String {
        switch self {
        case .faultTimedOut(let source, let local, let seconds):
            return "page 0x\(String(source, radix: 16)) (local 0x\(String(local, radix: 16))) did not arrive within "
                + "\(seconds) s of its first touch; the toucher got SIGBUS. Check that the seeder is reachable, "
                + "or raise the fault timeout"
        case .abandoned(let reason, let pages):
            return "post-copy abandoned (\(reason)): \(pages) pages never arrived and raise SIGBUS when touched; "
                + "the source process still holds them, so restart the migration"
        case .notMapped(let address):
            return "address 0x\(String(address, radix: 16)) is in no migrated region"
        }
    }
}

/// Regions of migrated memory filled by userfaultfd on first touch.
///
/// `@unchecked Sendable` invariant: `mappings`, `uffd`, `guardian`, `owner`
/// and `faultTimeout` are immutable after init; everything mutable (`bitmaps`,
/// `staged`, `pending`, counters, `failure`, `onFault`, `handler`) is only
/// touched under `lock`; the handler thread is joined before the descriptor closes.
public final class MissingFaultMemory: @unchecked Sendable {
    /// A region to map: its source range and the size of the pages to map
    /// it with (`FerrySystem.pageSize`, or a hugetlb page size to which the
    /// range is aligned).
    public struct Area: Sendable, Equatable {
        public var range: AddressRange
        public var pageSize: UInt64
        public init(_ range: AddressRange, pageSize: UInt64 = FerrySystem.pageSize) {
            self.range = range
            self.pageSize = pageSize
        }
        public var isHugetlb: Bool { pageSize > FerrySystem.pageSize }
    }

    /// One region: where it was at the source and where it is here, and
    /// the size of the pages it is mapped and filled with.
    public struct Mapping: Sendable, Equatable {
        public let source: AddressRange
        public let local: UInt64
        public let pageSize: UInt64
        init(source: AddressRange, local: UInt64, pageSize: UInt64 = FerrySystem.pageSize) {
            self.source = source
            self.local = local
            self.pageSize = pageSize
        }
        public var atSourceAddress: Bool { source.start == local }
        public var isHugetlb: Bool { pageSize > FerrySystem.pageSize }
        func localAddress(of source: UInt64) -> UInt64 { local + (source - self.source.start) }
    }

    /// The 4 KiB pages of one huge page, gathered until the last arrives.
    /// Not Sendable: lives in `staged`, under `lock`.
    private struct HugeStage {
        /// `size` bytes of anonymous memory, zero filled by the kernel.
        let buffer: UnsafeMutableRawPointer
        let size: UInt64
        private var arrived: [UInt64]
        private(set) var count = 0

        init(size: UInt64, owner: String) throws {
            // SAFETY: a fresh private mapping, owned by this stage until `release`.
            let pointer = mmap(nil, Int(size), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
            guard pointer != MAP_FAILED, let pointer else {
                throw SystemError(operation: "mmap \(size >> 10) KiB to stage a huge page", target: owner, errno: errno,
                                  hint: "not enough memory to gather a huge page before installing it")
            }
            buffer = pointer
            self.size = size
            arrived = Array(repeating: 0, count: Int(size / FerrySystem.pageSize + 63) / 64)
        }

        var isComplete: Bool { count == Int(size / FerrySystem.pageSize) }

        /// Marks 4 KiB page `index` arrived; false when it had already.
        mutating func mark(_ index: Int) -> Bool {
            let bit: UInt64 = 1 << UInt64(index & 63)
            guard arrived[index >> 6] & bit == 0 else { return false }
            arrived[index >> 6] |= bit
            count += 1
            return true
        }

        func release() { munmap(buffer, Int(size)) }
    }

    /// Counters for tests and benchmarks.
    public struct Statistics: Sendable, Equatable {
        /// Pages installed with UFFDIO_COPY / UFFDIO_ZEROPAGE (4 KiB pages;
        /// hugetlb pages count their 4 KiB pages as copied).
        public var pagesCopied = 0
        public var pagesZeroed = 0
        /// Huge pages installed whole (one UFFDIO_COPY each).
        public var hugePagesCopied = 0
        /// ioctls issued to install (one per contiguous run).
        public var installCalls = 0
        /// Pages offered again after they were installed: skipped, never re-installed.
        public var pagesAlreadyInstalled = 0
        /// Pages the kernel said were present although our bitmap did not (EEXIST).
        public var kernelAlreadyPresent = 0
        /// Fault messages read; those for a page already pending; those for a page already installed.
        public var faults = 0
        public var faultsCoalesced = 0
        public var faultsAlreadyResolved = 0
        /// Callbacks made: one per page however many threads touched it.
        public var faultCallbacks = 0
        public var pagesPoisoned = 0
    }

    /// The regions, in source address order.
    public let mappings: [Mapping]
    /// How long a touched page may take before the toucher gets SIGBUS.
    public let faultTimeout: Duration
    let uffd: Userfaultfd
    /// Holds a second copy of `uffd` for memory in another process, and
    /// poisons what is missing if we die unasked (FaultGuardian.swift).
    let guardian: FaultGuardian?
    /// Names the process holding the memory in errors: "our own process", "pid 4242".
    let owner: String
    /// Unmaps the regions (in whatever process holds them).
    private let unmapper: @Sendable ([Mapping]) -> Void

    private let lock = Lock()
    /// Installed (or poisoned) pages, one bit a page, per mapping.
    private var bitmaps: [[UInt64]]
    private var installedCount = 0
    /// Touched pages (source addresses; a huge page by its start) waiting
    /// for data, with the first touch's time.
    private var pending: [UInt64: ContinuousClock.Instant] = [:]
    /// Huge pages partly arrived, by source address.
    private var staged: [UInt64: HugeStage] = [:]
    private var stats = Statistics()
    private var failure: MissingFaultMemoryError?
    private var onFault: (@Sendable (UInt64) -> Void)?
    private var handler: pthread_t?
    private var unmapped = false
    /// Written once by `stopHandler` to end the handler's poll.
    private let stopPipe: (read: Int32, write: Int32)

    public let totalPages: Int

    init(uffd: Userfaultfd, mappings: [Mapping], owner: String, faultTimeout: Duration, guardian: FaultGuardian? = nil,
         unmapper: @escaping @Sendable ([Mapping]) -> Void) throws {
        self.uffd = uffd
        self.guardian = guardian
        self.mappings = mappings.sorted { $0.source.start < $1.source.start }
        self.owner = owner
        self.faultTimeout = faultTimeout
        self.unmapper = unmapper
        bitmaps = self.mappings.map { Array(repeating: 0, count: (Int($0.source.pageCount) + 63) / 64) }
        totalPages = self.mappings.reduce(0) { $0 + Int($1.source.pageCount) }
        var fds: [Int32] = [0, 0]
        try checkedCall("pipe", on: "the post-copy memory of \(owner)") { pipe(&fds) }
        for fd in fds { _ = fcntl(fd, F_SETFD, FD_CLOEXEC) }
        stopPipe = (fds[0], fds[1])
    }

    /// Maps `regions` (page aligned, disjoint) as empty private anonymous
    /// memory in this process, each at its source address when that is free
    /// and elsewhere otherwise, and registers them for missing faults.
    /// Faults block until `start(onFault:)` and an install resolve them.
    public static func inOwnProcess(regions: [AddressRange], faultTimeout: Duration = .seconds(30)) throws -> MissingFaultMemory {
        try inOwnProcess(areas: regions.map { Area($0) }, faultTimeout: faultTimeout)
    }

    /// `inOwnProcess(regions:)` for areas of any page size: hugetlb areas
    /// are mapped with MAP_HUGETLB of theirs and filled in whole huge pages.
    public static func inOwnProcess(areas: [Area], faultTimeout: Duration = .seconds(30)) throws -> MissingFaultMemory {
        let uffd = try Userfaultfd.forOwnProcess()
        _ = try uffd.enable([])
        var mappings: [Mapping] = []
        let unmapAll: @Sendable ([Mapping]) -> Void = { mappings in
            // SAFETY: each range was mapped by us below and is unmapped once (guarded by `unmapped`).
            for mapping in mappings { _ = munmap(UnsafeMutableRawPointer(bitPattern: UInt(mapping.local)), Int(mapping.source.length)) }
        }
        do {
            for area in areas where area.range.length > 0 {
                let local = try mapAnonymous(area)
                mappings.append(Mapping(source: area.range, local: local, pageSize: area.pageSize))
                try uffd.registerMissing(AddressRange(start: local, end: local + area.range.length))
            }
            return try MissingFaultMemory(uffd: uffd, mappings: mappings, owner: "our own process",
                                          faultTimeout: faultTimeout, unmapper: unmapAll)
        } catch {
            unmapAll(mappings)
            throw error
        }
    }

    /// MAP_FIXED_NOREPLACE at the source address, anywhere when taken.
    private static func mapAnonymous(_ area: Area) throws -> UInt64 {
        let region = area.range
        let length = Int(region.length)
        let flags = mapFlags(area)
        let wanted = UnsafeMutableRawPointer(bitPattern: UInt(region.start))
        // SAFETY: NOREPLACE never touches an existing mapping; a result elsewhere
        // (kernels before 4.17 treat the address as a hint) is unmapped again.
        let fixed = mmap(wanted, length, PROT_READ | PROT_WRITE, flags | Self.mapFixedNoReplace, -1, 0)
        if fixed != MAP_FAILED {
            if fixed == wanted { return region.start }
            munmap(fixed, length)
        }
        // SAFETY: a fresh mapping wherever the kernel chooses.
        let anywhere = mmap(nil, length, PROT_READ | PROT_WRITE, flags, -1, 0)
        guard anywhere != MAP_FAILED, let anywhere else {
            let error = errno
            throw SystemError(operation: "mmap \(length) bytes", target: "region \(region) in our own process", errno: error,
                              hint: mapHint(area, error))
        }
        return UInt64(UInt(bitPattern: anywhere))
    }

    /// Private anonymous memory; hugetlb in the area's page size, reserved
    /// at once (no MAP_NORESERVE), so a pool too small fails the mmap here
    /// rather than an install later.
    static func mapFlags(_ area: Area) -> Int32 {
        area.isHugetlb ? MAP_PRIVATE | MAP_ANONYMOUS | ferry_map_hugetlb_flags(area.pageSize)
                       : MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE
    }

    /// What to do when mapping `area` failed with `error`.
    static func mapHint(_ area: Area, _ error: Int32) -> String {
        guard area.isHugetlb else { return "not enough address space or memory for the migrated regions" }
        let kib = area.pageSize >> 10
        return "the hugetlb pool lacks \(area.range.length / area.pageSize) free pages of \(kib) KiB for this region: "
            + "raise /sys/kernel/mm/hugepages/hugepages-\(kib)kB/nr_hugepages (vm.nr_hugepages for the default size)"
    }

    /// MAP_FIXED_NOREPLACE (Linux 4.17), spelled out: older glibc headers lack it.
    static let mapFixedNoReplace: Int32 = 0x100000

    deinit {
        // Another process's memory outlives us: dropped without `finish()`,
        // it must not be left reading zeros where pages never arrived.
        if guardian != nil && !isComplete { fail("post-copy was dropped before every page arrived") }
        stopHandler()
        for stage in staged.values { stage.release() }
        uffd.close()
        guardian?.dismiss()
        Glibc.close(stopPipe.read)
        Glibc.close(stopPipe.write)
    }

    // MARK: - Lookup

    /// The mapping holding source address `source`.
    public func mapping(containing source: UInt64) -> Mapping? {
        var low = 0, high = mappings.count
        while low < high {
            let mid = (low + high) / 2
            if mappings[mid].source.end <= source { low = mid + 1 } else { high = mid }
        }
        return low < mappings.count && mappings[low].source.contains(source) ? mappings[low] : nil
    }

    /// Where source address `source` lives here; nil outside every region.
    public func localAddress(of source: UInt64) -> UInt64? {
        mapping(containing: source)?.localAddress(of: source)
    }

    /// The source address of local address `local`; nil outside every region.
    public func sourceAddress(of local: UInt64) -> UInt64? {
        for mapping in mappings where local >= mapping.local && local < mapping.local + mapping.source.length {
            return mapping.source.start + (local - mapping.local)
        }
        return nil
    }

    public var statistics: Statistics { lock.withLock { stats } }
    public var installedPages: Int { lock.withLock { installedCount } }
    public var isComplete: Bool { lock.withLock { installedCount == totalPages } }
    /// Set once a page timed out or post-copy was abandoned.
    public var failureReason: MissingFaultMemoryError? { lock.withLock { failure } }
    /// Touched pages still waiting for data.
    public var pendingFaults: [UInt64] { lock.withLock { Array(pending.keys) } }

    public func isInstalled(_ source: UInt64) -> Bool {
        lock.withLock {
            guard let (m, i) = locate(source) else { return false }
            return bit(m, i)
        }
    }

    private func locate(_ source: UInt64) -> (Int, Int)? {
        var low = 0, high = mappings.count
        while low < high {
            let mid = (low + high) / 2
            if mappings[mid].source.end <= source { low = mid + 1 } else { high = mid }
        }
        guard low < mappings.count, mappings[low].source.contains(source) else { return nil }
        return (low, Int((source - mappings[low].source.start) / pageSize))
    }

    private func bit(_ m: Int, _ i: Int) -> Bool { bitmaps[m][i >> 6] & (1 << UInt64(i & 63)) != 0 }
    private func setBits(_ m: Int, _ from: Int, _ count: Int) {
        for i in from..<from + count { bitmaps[m][i >> 6] |= 1 << UInt64(i & 63) }
        installedCount += count
    }

    // MARK: - Installing

    /// Installs whole pages at source range `range` (`data.count == range.length`).
    /// Pages already installed are skipped, never copied again; a page that
    /// was touched wakes its toucher. Pages outside every region are ignored.
    /// In hugetlb regions the pages are staged until their huge page is
    /// whole, then installed with it. Returns the number of pages newly
    /// installed (4 KiB pages).
    @discardableResult
    public func install(_ range: AddressRange, data: UnsafeRawBufferPointer) throws -> Int {
        precondition(UInt64(data.count) == range.length, "page data does not match its range")
        return try installRuns(range, data: data) { local, offset, length, done in
            var copy = uffdio_copy(dst: local, src: UInt64(UInt(bitPattern: data.baseAddress!)) + offset,
                                   len: length, mode: 0, copy: 0)
            // SAFETY: `src` points into `data`, which holds `length` bytes from `offset`;
            // `dst` is inside a mapping we registered.
            let result = try uffd.withDescriptor { fd in ferry_uffdio_copy(fd, &copy) }
            done = copy.copy > 0 ? UInt64(copy.copy) : 0
            return result < 0 ? errno : 0
        } count: { stats.pagesCopied += $0 }
    }

    /// Installs all-zero pages at source range `range` with the zero page
    /// (staged as zeros in hugetlb regions, which have no zero page).
    @discardableResult
    public func installZero(_ range: AddressRange) throws -> Int {
        try installRuns(range, data: nil) { local, _, length, done in
            var zero = uffdio_zeropage(range: uffdio_range(start: local, len: length), mode: 0, zeropage: 0)
            // SAFETY: `local..<local+length` is inside a mapping we registered; the kernel only writes `zeropage`.
            let result = try uffd.withDescriptor { fd in ferry_uffdio_zeropage(fd, &zero) }
            done = zero.zeropage > 0 ? UInt64(zero.zeropage) : 0
            return result < 0 ? errno : 0
        } count: { stats.pagesZeroed += $0 }
    }

    /// Runs `ioctl(local, offsetInRange, length, &bytesDone) -> errno` for each
    /// contiguous run of pages of `range` not installed yet, under `lock`.
    /// EAGAIN (the map is changing) is retried from where it stopped; EEXIST
    /// (present already) marks the page and moves past it. Hugetlb regions
    /// take `data` (nil: zeros) into their huge pages' stages instead.
    private func installRuns(_ range: AddressRange, data: UnsafeRawBufferPointer?,
                             _ ioctl: (UInt64, UInt64, UInt64, inout UInt64) throws -> Int32,
                             count: (Int) -> Void) throws -> Int {
        try lock.withLock {
            var installed = 0
            var address = range.start
            while address < range.end {
                guard let (m, first) = locateOrNext(address, limit: range.end) else { break }
                let mapping = mappings[m]
                let stop = min(range.end, mapping.source.end)
                if mapping.isHugetlb {
                    installed += try stageLocked(m, from: max(address, mapping.source.start), to: stop,
                                                 data: data.map { ($0, range.start) })
                    address = stop
                    continue
                }
                let pages = Int((stop - max(address, mapping.source.start)) / pageSize)
                var i = first
                while i < first + pages {
                    if bit(m, i) { stats.pagesAlreadyInstalled += 1; i += 1; continue }
                    var j = i
                    while j < first + pages && !bit(m, j) { j += 1 }
                    // Pages i..<j are missing: one ioctl for the run.
                    var runStart = i
                    var attempts = 0
                    while runStart < j {
                        let source = mapping.source.start + UInt64(runStart) * pageSize
                        let length = UInt64(j - runStart) * pageSize
                        var done: UInt64 = 0
                        stats.installCalls += 1
                        let error = try ioctl(mapping.localAddress(of: source), source - range.start, length, &done)
                        let donePages = Int(done / pageSize)
                        if donePages > 0 {
                            setBits(m, runStart, donePages)
                            installed += donePages
                            count(donePages)
                            for page in 0..<donePages { pending[source + UInt64(page) * pageSize] = nil }
                            runStart += donePages
                        }
                        switch error {
                        case 0:
                            runStart = j
                        case EAGAIN:
                            attempts += 1
                            if attempts > Userfaultfd.busyRetries {
                                throw SystemError(operation: "UFFDIO_COPY", target: "\(owner) at 0x\(String(source, radix: 16))",
                                                  errno: EAGAIN, hint: "the memory map kept changing")
                            }
                            usleep(attempts < 10 ? 0 : 100)
                        case EEXIST:
                            // Present without us: keep it, never overwrite; wake anyone waiting on it.
                            let page = mapping.source.start + UInt64(runStart) * pageSize
                            stats.kernelAlreadyPresent += 1
                            setBits(m, runStart, 1)
                            pending[page] = nil
                            let local = mapping.localAddress(of: page)
                            try? uffd.wake(AddressRange(start: local, end: local + pageSize))
                            runStart += 1
                        default:
                            throw SystemError(operation: "installing pages", target: "\(owner) at 0x\(String(source, radix: 16)) "
                                              + "(local 0x\(String(mapping.localAddress(of: source), radix: 16)))", errno: error,
                                              hint: error == ENOENT ? "the region was unmapped by its program" : nil)
                        }
                    }
                    i = j
                }
                address = stop
            }
            return installed
        }
    }

    /// Stages the 4 KiB pages `from..<to` of hugetlb mapping `m` (`data`
    /// holds them at offset `page - dataStart`; nil: zeros) and installs
    /// each huge page whose pages are all there. Caller holds `lock`.
    /// Returns the 4 KiB pages newly installed.
    private func stageLocked(_ m: Int, from: UInt64, to: UInt64,
                             data: (bytes: UnsafeRawBufferPointer, start: UInt64)?) throws -> Int {
        let mapping = mappings[m]
        let size = mapping.pageSize
        var installed = 0
        var page = from
        while page < to {
            let huge = page & ~(size - 1)
            let end = min(to, huge + size)
            defer { page = end }
            if bit(m, Int((huge - mapping.source.start) / pageSize)) {
                stats.pagesAlreadyInstalled += Int((end - page) / pageSize)
                continue
            }
            // Taken out while it changes, so its bitmap is not copied on write.
            var stage = try staged.removeValue(forKey: huge) ?? HugeStage(size: size, owner: owner)
            // Every copy of a page after Finalize holds the same bytes (the
            // frozen source's), so a page staged again is simply written again.
            // SAFETY: `page..<end` lies inside this huge page's buffer, and
            // inside `data` (the caller's range covers it).
            if let data {
                memcpy(stage.buffer + Int(page - huge), data.bytes.baseAddress! + Int(page - data.start), Int(end - page))
            } else {
                memset(stage.buffer + Int(page - huge), 0, Int(end - page))
            }
            var index = Int((page - huge) / pageSize)
            for _ in 0..<Int((end - page) / pageSize) {
                if !stage.mark(index) { stats.pagesAlreadyInstalled += 1 }
                index += 1
            }
            guard stage.isComplete else {
                staged[huge] = stage
                continue
            }
            defer { stage.release() }
            installed += try copyHugeLocked(m, huge, from: stage.buffer)
        }
        return installed
    }

    /// Installs the huge page at source address `huge` of mapping `m` with
    /// one UFFDIO_COPY from `buffer` (its whole size). Caller holds `lock`.
    private func copyHugeLocked(_ m: Int, _ huge: UInt64, from buffer: UnsafeMutableRawPointer) throws -> Int {
        let mapping = mappings[m]
        let local = mapping.localAddress(of: huge)
        let pages = Int(mapping.pageSize / pageSize)
        let first = Int((huge - mapping.source.start) / pageSize)
        var attempts = 0
        while true {
            var copy = uffdio_copy(dst: local, src: UInt64(UInt(bitPattern: buffer)), len: mapping.pageSize, mode: 0, copy: 0)
            stats.installCalls += 1
            // SAFETY: `src` is a stage of `len` bytes; `dst` a whole huge page of a mapping we registered.
            let result = try uffd.withDescriptor { fd in ferry_uffdio_copy(fd, &copy) }
            let error = result < 0 ? errno : 0
            if error == 0 || copy.copy == Int64(mapping.pageSize) {
                setBits(m, first, pages)
                stats.pagesCopied += pages
                stats.hugePagesCopied += 1
                pending[huge] = nil
                return pages
            }
            switch error {
            case EAGAIN:
                attempts += 1
                if attempts > Userfaultfd.busyRetries {
                    throw SystemError(operation: "UFFDIO_COPY of a huge page", target: "\(owner) at 0x\(String(huge, radix: 16))",
                                      errno: EAGAIN, hint: "the memory map kept changing")
                }
                usleep(attempts < 10 ? 0 : 100)
            case EEXIST:
                // Present without us: keep it, never overwrite; wake anyone waiting on it.
                stats.kernelAlreadyPresent += 1
                setBits(m, first, pages)
                pending[huge] = nil
                try? uffd.wake(AddressRange(start: local, end: local + mapping.pageSize))
                return 0
            default:
                let kib = mapping.pageSize >> 10
                throw SystemError(operation: "installing a huge page of \(kib) KiB",
                                  target: "\(owner) at 0x\(String(huge, radix: 16)) (local 0x\(String(local, radix: 16)))",
                                  errno: error,
                                  hint: error == ENOENT ? "the region was unmapped by its program"
                                      : error == ENOMEM ? "no free huge page of \(kib) KiB in the pool "
                                                          + "(/sys/kernel/mm/hugepages/hugepages-\(kib)kB/nr_hugepages)" : nil)
            }
        }
    }

    private func locateOrNext(_ address: UInt64, limit: UInt64) -> (Int, Int)? {
        var low = 0, high = mappings.count
        while low < high {
            let mid = (low + high) / 2
            if mappings[mid].source.end <= address { low = mid + 1 } else { high = mid }
        }
        guard low < mappings.count, mappings[low].source.start < limit else { return nil }
        let start = max(address, mappings[low].source.start)
        return (low, Int((start - mappings[low].source.start) / pageSize))
    }

    /// Source ranges of pages not installed yet, coalesced, in address order.
    public func missingRanges() -> [AddressRange] {
        lock.withLock {
            var out: [AddressRange] = []
            for (m, mapping) in mappings.enumerated() {
                var i = 0
                let n = Int(mapping.source.pageCount)
                while i < n {
                    if bit(m, i) { i += 1; continue }
                    var j = i
                    while j < n && !bit(m, j) { j += 1 }
                    out.append(AddressRange(start: mapping.source.start + UInt64(i) * pageSize,
                                            end: mapping.source.start + UInt64(j) * pageSize))
                    i = j
                }
            }
            return out
        }
    }

    /// Marks pages of `range` (source addresses) that nothing backs in the
    /// source (past the end of its file): they raise SIGBUS when touched, as
    /// they did there. Returns how many were marked.
    @discardableResult
    public func installHole(_ range: AddressRange) -> Int {
        lock.withLock { poisonLocked(range) }
    }

    // MARK: - Failing cleanly

    /// Poisons the missing pages of `range` (source addresses): each then
    /// raises SIGBUS when touched, and blocked touchers are woken to get it.
    /// Caller holds `lock`.
    private func poisonLocked(_ range: AddressRange) -> Int {
        var poisoned = 0
        var address = range.start
        while address < range.end, let (m, _) = locateOrNext(address, limit: range.end) {
            let mapping = mappings[m]
            let stop = min(range.end, mapping.source.end)
            // In units of the mapping's pages: hugetlb memory is poisoned in whole huge pages.
            let unit = mapping.pageSize
            let from = max(address, mapping.source.start) & ~(unit - 1)
            let first = Int((from - mapping.source.start) / pageSize)
            let pages = Int(((stop + unit - 1) & ~(unit - 1)) - from) / Int(pageSize)
            let step = Int(unit / pageSize)
            for i in stride(from: first, to: first + pages, by: step) where !bit(m, i) {
                let source = mapping.source.start + UInt64(i) * pageSize
                let local = mapping.localAddress(of: source)
                var request = uffdio_poison(range: uffdio_range(start: local, len: unit), mode: 0, updated: 0)
                var attempts = 0
                while true {
                    // SAFETY: one page of the mapping's size inside a mapping we registered; the kernel only writes `updated`.
                    let result = (try? uffd.withDescriptor { fd in ferry_uffdio_poison(fd, &request) }) ?? -1
                    if result == 0 || errno == EEXIST { break }
                    attempts += 1
                    if errno != EAGAIN || attempts > 1000 { break }
                    usleep(100)
                }
                setBits(m, i, step)
                pending[source] = nil
                staged.removeValue(forKey: source)?.release()
                poisoned += step
            }
            address = stop
        }
        stats.pagesPoisoned += poisoned
        return poisoned
    }

    /// Gives up on every page not installed yet: they raise SIGBUS when
    /// touched (now and later) instead of blocking or reading zeros.
    /// Returns the error recorded, which names how many pages were lost.
    @discardableResult
    public func fail(_ reason: String) -> MissingFaultMemoryError {
        lock.withLock {
            var poisoned = 0
            for mapping in mappings { poisoned += poisonLocked(mapping.source) }
            let error = MissingFaultMemoryError.abandoned(reason: reason, pagesPoisoned: poisoned)
            if failure == nil || poisoned > 0 { failure = error }
            return failure ?? error
        }
    }

    // MARK: - Faults

    /// Starts the handler thread: each touched missing page is reported once
    /// to `onFault` (source address, aligned to the page size of its mapping:
    /// a huge page is reported by its start), from the handler thread;
    /// `onFault` should return quickly (queue a fetch, or install at once).
    public func start(onFault: @escaping @Sendable (UInt64) -> Void) throws {
        try lock.withLock {
            guard handler == nil else { return }
            self.onFault = onFault
            // The thread keeps the memory alive until its loop ends.
            handler = try startThread(for: "the post-copy fault handler of \(owner)") { [self] in handleFaults() }
        }
    }

    /// Stops the handler thread. Pages still missing stay registered: a
    /// touch then blocks until an install or `fail`. Call `finish()` instead
    /// once every page is installed.
    public func stopHandler() {
        let thread: pthread_t? = lock.withLock {
            defer { handler = nil }
            return handler
        }
        guard let thread else { return }
        var byte: UInt8 = 1
        _ = Glibc.write(stopPipe.write, &byte, 1)
        pthread_join(thread, nil)
        var drain: UInt8 = 0
        _ = Glibc.read(stopPipe.read, &drain, 1)
    }

    /// Ends post-copy: stops the handler, closes the descriptor and
    /// dismisses the guardian (waiting for it to exit), which unregisters
    /// the regions; pages not installed by then are poisoned first, so
    /// nothing reads zeros that the source did not hold. The memory stays
    /// mapped and belongs to the program.
    public func finish() {
        if !isComplete { fail("post-copy ended before every page arrived") }
        stopHandler()
        uffd.close()
        guardian?.dismiss()
    }

    /// The pid of the guardian process, for memory in another process.
    public var guardianPid: Int32? { guardian?.pid }

    /// Unmaps the regions (once). Only for memory nobody touches any more.
    public func unmap() {
        let doIt: Bool = lock.withLock {
            defer { unmapped = true }
            return !unmapped
        }
        guard doIt else { return }
        finish()
        unmapper(mappings)
    }

    /// The handler thread: read fault messages, report each page once, and
    /// poison pages that waited longer than `faultTimeout`.
    private func handleFaults() {
        var events: [UserfaultfdEvent] = []
        events.reserveCapacity(64)
        let timeoutMs = Int32(max(1, min(50, faultTimeout.components.seconds * 1000 / 4
                                         + faultTimeout.components.attoseconds / 4_000_000_000_000_000)))
        do {
            try uffd.withDescriptor { fd in
                var fds = [pollfd(fd: fd, events: Int16(POLLIN), revents: 0),
                           pollfd(fd: stopPipe.read, events: Int16(POLLIN), revents: 0)]
                while true {
                    let anyPending = lock.withLock { !pending.isEmpty }
                    let ready = poll(&fds, 2, anyPending ? timeoutMs : -1)
                    if ready < 0 {
                        if errno == EINTR { continue }
                        throw SystemError(operation: "poll userfaultfd", target: owner, errno: errno)
                    }
                    if fds[1].revents != 0 { return }
                    if fds[0].revents & Int16(POLLERR | POLLHUP) != 0 { return }
                    events.removeAll(keepingCapacity: true)
                    if fds[0].revents != 0 { try uffd.readEvents(into: &events) }
                    handle(events)
                    expireTimedOutFaults()
                }
            }
        } catch {
            // The descriptor is gone or broken: nothing more can be resolved.
            _ = fail("the fault handler stopped: \(error)")
        }
    }

    private func handle(_ events: [UserfaultfdEvent]) {
        var report: [UInt64] = []
        let callback: (@Sendable (UInt64) -> Void)? = lock.withLock {
            let now = ContinuousClock.now
            for event in events {
                guard case .pageFault(let address, _) = event else { continue }
                stats.faults += 1
                guard let touched = sourceAddress(of: address), let mapping = self.mapping(containing: touched) else { continue }
                // The page of the mapping's size: a huge page is fetched and installed whole.
                let source = touched & ~(mapping.pageSize - 1)
                guard let (m, i) = locate(source) else { continue }
                let local = mapping.localAddress(of: source)
                if bit(m, i) {
                    // Installed between the touch and our read: the install woke it.
                    stats.faultsAlreadyResolved += 1
                    try? uffd.wake(AddressRange(start: local, end: local + mapping.pageSize))
                } else if pending[source] != nil {
                    stats.faultsCoalesced += 1
                } else {
                    pending[source] = now
                    stats.faultCallbacks += 1
                    report.append(source)
                }
            }
            return onFault
        }
        // Outside the lock: the callback may install at once.
        for source in report { callback?(source) }
    }

    private func expireTimedOutFaults() {
        lock.withLock {
            let now = ContinuousClock.now
            for (source, since) in pending where now - since >= faultTimeout {
                guard poisonLocked(AddressRange(start: source, end: source + pageSize)) > 0 else { continue }
                let seconds = Double(faultTimeout.components.seconds) + Double(faultTimeout.components.attoseconds) / 1e18
                if failure == nil {
                    failure = .faultTimedOut(source: source, local: localAddress(of: source) ?? 0, seconds: seconds)
                }
            }
        }
    }
}

extension Userfaultfd {
    /// UFFDIO_REGISTER in missing mode only (post-copy: no write-protection).
    func registerMissing(_ range: AddressRange) throws {
        var request = uffdio_register(range: uffdio_range(start: range.start, len: range.length),
                                      mode: ferry_uffdio_register_mode_missing(), ioctls: 0)
        try withDescriptor { fd in
            try checkedCall("UFFDIO_REGISTER (missing mode)", on: "\(target) at \(range)") { ferry_uffdio_register(fd, &request) }
        }
    }
}
