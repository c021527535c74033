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
#if canImport(Glibc)
import Glibc
#endif
internal import CFerryLinux
import FerryToolkit
import Synchronization

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
/// `mappings`, `uffd`, `guardian`, `owner` and `faultTimeout` are immutable
/// after init; everything mutable is in `state`; the handler thread is joined
/// before the descriptor closes. Installing lives in
/// MissingFaultMemory+Install.swift, the fault handler thread in
/// MissingFaultMemory+Faults.swift.
public final class MissingFaultMemory: Sendable {
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
    let unmapper: @Sendable ([Mapping]) -> Void

    /// Everything mutable, under one lock (see `State`).
    let state: Mutex<State>
    /// The handler thread's id while it runs, 0 otherwise (for assertions).
    let handlerThread = Atomic<pthread_t>(0)
    /// Written once by `stopHandler` to end the handler's poll.
    let stopPipe: StopPipe

    public let totalPages: Int

    init(uffd: Userfaultfd, mappings: [Mapping], owner: String, faultTimeout: Duration, guardian: FaultGuardian? = nil,
         unmapper: @escaping @Sendable ([Mapping]) -> Void) throws {
        self.uffd = uffd
        self.guardian = guardian
        self.mappings = mappings.sorted { $0.source.start < $1.source.start }
        self.owner = owner
        self.faultTimeout = faultTimeout
        self.unmapper = unmapper
        state = Mutex(State(bitmaps: self.mappings.map { Array(repeating: 0, count: (Int($0.source.pageCount) + 63) / 64) }))
        totalPages = self.mappings.reduce(0) { $0 + Int($1.source.pageCount) }
        stopPipe = try StopPipe(for: "the post-copy memory of \(owner)")
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
        state.withLock { state in
            for stage in state.staged.values { stage.release() }
        }
        uffd.close()
        guardian?.dismiss()
        stopPipe.close()
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

    public var statistics: Statistics { state.withLock { $0.stats } }
    public var installedPages: Int { state.withLock { $0.installedCount } }
    public var isComplete: Bool { state.withLock { $0.installedCount == totalPages } }
    /// Set once a page timed out or post-copy was abandoned.
    public var failureReason: MissingFaultMemoryError? { state.withLock { $0.failure } }

    public func isInstalled(_ source: UInt64) -> Bool {
        guard let (m, i) = locate(source) else { return false }
        return state.withLock { $0.bit(m, i) }
    }

    func locate(_ source: UInt64) -> (Int, Int)? {
        var low = 0, high = mappings.count
        while low < high {
            let mid = (low + high) / 2
            if mappings[mid].source.end <= source { low = mid + 1 } else { high = mid }
        }
        guard low < mappings.count, mappings[low].source.contains(source) else { return nil }
        return (low, Int((source - mappings[low].source.start) / pageSize))
    }

    /// Gives up on every page not installed yet: they raise SIGBUS when
    /// touched (now and later) instead of blocking or reading zeros.
    /// Returns the error recorded, which names how many pages were lost.
    @discardableResult
    public func fail(_ reason: String) -> MissingFaultMemoryError {
        state.withLock { state in
            var poisoned = 0
            for mapping in mappings { poisoned += poison(mapping.source, state: &state) }
            let error = MissingFaultMemoryError.abandoned(reason: reason, pagesPoisoned: poisoned)
            if state.failure == nil || poisoned > 0 { state.failure = error }
            return state.failure ?? error
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
