// The facade the rest of Ferry uses: one running process, attached by pid,
// whose writes are tracked while it runs, whose pages can be read, and which
// can be frozen, thawed and let go without a trace.
//
// How attaching works: freeze every thread (Freezer), make one thread create a
// userfaultfd by remote system call (RemoteSyscall), copy the descriptor to
// us with pidfd_getfd, make the target close its copy, thaw. From then on the
// target runs untraced; only `freeze()` traces it again, from the same
// dedicated ptrace thread (see Ptrace.swift).
// Kernel: 5.7+ (sync tracker), 6.7+ (async tracker). Capability: root or
// CAP_SYS_PTRACE over the target.
#if canImport(Glibc)
import Glibc
#endif
internal import CFerryLinux
import FerryToolkit
import Synchronization

/// A process whose writes are tracked.
///
/// Every mutable property lives in `state`; `scanLock` serializes the
/// scan/refresh/track operations that change registrations, so that a
/// registration and the bookkeeping that records it cannot interleave with
/// another; ptrace state (`frozen`) is only acted on inside `ptrace.run`.
public final class TrackedProcess: Sendable {
    public let pid: Int32
    public let trackerKind: TrackerKind

    private let tracker: any DirtyTracker
    private let reader: PageReader
    private let ptrace: PtraceThread
    private let scanLock = Mutex(())

    private struct State {
        var regions: [Region]
        var unprotectable: [Region] = []
        /// Ranges registered with the tracker, merged.
        var tracked: [AddressRange] = []
        /// New or grown parts found by `refreshLayout`, or lost registrations:
        /// reported dirty in full by the next scan.
        var pendingDirty: [AddressRange] = []
        var tracking = false
        var frozen: FrozenProcess?
        var detached = false
        var lastFreezeLatency: Duration?
        var signalStopsSeen = 0
    }
    private let state: Mutex<State>

    /// Signal-delivery stops seen by all freezes so far (tests look at it).
    var signalStopsSeen: Int { state.withLock { $0.signalStopsSeen } }

    // MARK: - Attach

    /// Attaches to `pid` with `tracker`, or the best tracker this kernel offers when nil.
    /// The process keeps running; call `startTracking()` to begin.
    public static func attach(pid: Int32, tracker requested: TrackerKind? = nil) throws -> TrackedProcess {
        try checkTarget(pid: pid)
        let kind: TrackerKind
        var available: UserfaultfdFeatures = []
        if requested == .softDirty {
            kind = .softDirty
        } else {
            guard let features = try? Userfaultfd.probeKernelFeatures() else { throw AttachError.noUserfaultfd }
            guard features.contains(.writeProtect) else { throw AttachError.noWriteProtect }
            available = features
            if requested == .async && !features.contains(.wpAsync) {
                throw AttachError.trackerUnavailable(.async, reason: "this kernel lacks UFFD_FEATURE_WP_ASYNC and PAGEMAP_SCAN (kernel 6.7 or newer)")
            }
            kind = requested ?? (features.contains(.wpAsync) ? .async : .sync)
        }

        let reader: PageReader
        do { reader = try PageReader(pid: pid) } catch { throw AttachError.noSuchProcess(pid: pid) }
        let ptrace = try PtraceThread()
        do {
            let tracker: any DirtyTracker
            switch kind {
            case .softDirty:
                tracker = try SoftDirtyTracker(pid: pid)
            case .async, .sync:
                let fd = try createUserfaultfd(pid: pid, on: ptrace, allowUserModeOnly: kind == .async)
                let uffd = Userfaultfd(adopting: fd, target: "pid \(pid)")
                // Sync mode leaves out WP_UNPOPULATED on purpose: its pte
                // markers turn every touch of an empty anonymous page into a
                // missing fault that UFFDIO_ZEROPAGE refuses (EEXIST), a
                // livelock; missing mode covers empty pages instead (SyncWPTracker.swift).
                let wanted: UserfaultfdFeatures = kind == .async
                    ? [.wpAsync, .wpUnpopulated, .wpHugetlbfsShmem]
                    : [.wpHugetlbfsShmem, .eventRemove, .eventUnmap, .eventRemap]
                do {
                    _ = try uffd.enable(wanted.intersection(available))
                } catch {
                    throw AttachError.system(pid: pid, step: "enabling userfaultfd features", underlying: "\(error)")
                }
                if kind == .async {
                    tracker = try AsyncWPTracker(uffd: uffd, pid: pid)
                } else {
                    tracker = try SyncWPTracker(uffd: uffd, pid: pid)
                }
            }
            let regions: [Region]
            do { regions = try ProcessMaps.read(pid: pid) } catch { tracker.close(); throw AttachError.processExited(pid: pid) }
            return TrackedProcess(pid: pid, kind: kind, tracker: tracker, reader: reader, ptrace: ptrace, regions: regions)
        } catch {
            ptrace.stop()
            throw error
        }
    }

    private init(pid: Int32, kind: TrackerKind, tracker: any DirtyTracker, reader: PageReader,
                 ptrace: PtraceThread, regions: [Region]) {
        self.pid = pid
        self.trackerKind = kind
        self.tracker = tracker
        self.reader = reader
        self.ptrace = ptrace
        self.state = Mutex(State(regions: regions))
    }

    deinit {
        try? detach()
    }

    /// Checks, without stopping or tracing it, that `pid` is a process we
    /// may attach to: the checks `attach` starts with, then the kernel's
    /// ptrace access check itself. Opening /proc/PID/mem needs the same
    /// PTRACE_MODE_ATTACH rights as PTRACE_SEIZE and pidfd_getfd (Yama's
    /// ptrace_scope and LSMs included), so a refusal here is the refusal
    /// attaching would meet later. For callers that must know before they
    /// commit to anything, such as the leecher's `--into PID`, which freezes
    /// the source long before it attaches to its target.
    public static func checkAttachable(pid: Int32) throws {
        try checkTarget(pid: pid)
        // Through a live thread: the memory file of an exited leader says ESRCH.
        let (fd, path) = ThreadGroup.openProcFile("mem", of: pid, flags: O_RDONLY)
        guard fd >= 0 else {
            switch errno {
            case ENOENT, ESRCH: throw AttachError.noSuchProcess(pid: pid)
            case EACCES, EPERM: throw AttachError.permissionDenied(pid: pid, operation: "opening \(path)")
            default: throw AttachError.system(pid: pid, step: "opening \(path)", underlying: SystemError.text(errno))
            }
        }
        close(fd)
    }

    /// Refuses targets we cannot or must not trace, with the reason.
    private static func checkTarget(pid: Int32) throws {
        guard pid > 0 else { throw AttachError.invalidPid(pid: pid) }
        guard pid != getpid() else { throw AttachError.ownProcess(pid: pid) }
        guard let status = readProcFile("/proc/\(pid)/status") else {
            if errno == EACCES || errno == EPERM { throw AttachError.permissionDenied(pid: pid, operation: "reading /proc/\(pid)/status") }
            throw AttachError.noSuchProcess(pid: pid)
        }
        var fields: [Substring: Substring] = [:]
        for line in status.split(separator: "\n") {
            guard let colon = line.firstIndex(of: ":") else { continue }
            fields[line[..<colon]] = line[line.index(after: colon)...].drop { $0 == " " || $0 == "\t" }
        }
        let name = String(fields["Name"] ?? "?")
        if let tgid = fields["Tgid"].flatMap({ Int32($0) }), tgid != pid {
            // The tgid is the way in even when its main thread has exited
            // (ThreadGroup.swift): say so, since that is when people try a thread.
            throw AttachError.notThreadGroupLeader(pid: pid, process: tgid, leaderExited: ThreadGroup.leaderHasExited(tgid))
        }
        if fields["Kthread"] == "1" { throw AttachError.kernelThread(pid: pid, name: name) }
        if let stat = readProcFile("/proc/\(pid)/stat"), let close = stat.lastIndex(of: ")") {
            let rest = stat[stat.index(after: close)...].split(separator: " ")
            // Fields after the command: state(3) ppid pgrp session tty tpgid flags(9).
            let pfKthread: UInt64 = 0x0020_0000
            if rest.count > 6, let flags = UInt64(rest[6]), flags & pfKthread != 0 {
                throw AttachError.kernelThread(pid: pid, name: name)
            }
            // A zombie leader whose other threads run on is a live process:
            // it is reached through one of them (ThreadGroup.swift).
            if rest.first == "Z" {
                guard let live = ThreadGroup.liveThread(of: pid) else { throw AttachError.processExited(pid: pid) }
                // The leader's status names no tracer of the others.
                if let text = readProcFile("/proc/\(pid)/task/\(live)/status") {
                    for line in text.split(separator: "\n") where line.hasPrefix("TracerPid:") {
                        fields["TracerPid"] = line.dropFirst(10).drop { $0 == " " || $0 == "\t" }
                    }
                }
            }
        }
        if let tracer = fields["TracerPid"].flatMap({ Int32($0) }), tracer != 0 {
            // TracerPid names the tracing thread; people know its process.
            var process = tracer
            if let text = readProcFile("/proc/\(tracer)/status"),
               let line = text.split(separator: "\n").first(where: { $0.hasPrefix("Tgid:") }),
               let tgid = Int32(line.dropFirst(5).trimmingPrefix(while: { $0 == " " || $0 == "\t" })) {
                process = tgid
            }
            throw AttachError.alreadyTraced(pid: pid, tracer: process)
        }
    }

    private static func readProcFile(_ path: String) -> String? {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return nil }
        defer { close(fd) }
        var bytes: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 4096)
        while true {
            // SAFETY: reads at most the chunk's size into it.
            let n = chunk.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress, $0.count) }
            if n <= 0 { break }
            bytes += chunk[0..<n]
        }
        return String(decoding: bytes, as: UTF8.self)
    }

    /// Creates a userfaultfd inside `pid` and returns our copy of it.
    private static func createUserfaultfd(pid: Int32, on ptrace: PtraceThread, allowUserModeOnly: Bool) throws -> Int32 {
        do {
            // Ctrl-C and the like wait until the target's registers are back (DeferredSignals.swift).
            return try DeferredSignals.during { try ptrace.run {
                let frozen = try Freezer.freeze(pid: pid)
                defer { try? Freezer.thaw(frozen) }
                let remote = try RemoteSyscall(frozen: frozen)
                let number = Int(ferry_syscall_number_userfaultfd())
                let flags = UInt64(O_CLOEXEC | O_NONBLOCK)
                var result = try remote.call(number, flags)
                if result == -Int(EPERM) && allowUserModeOnly {
                    // Without CAP_SYS_PTRACE in the target, user-mode-only
                    // descriptors are still allowed; async WP needs no more.
                    result = try remote.call(number, flags | UInt64(ferry_uffd_user_mode_only()))
                }
                if result == -Int(ENOSYS) { throw AttachError.noUserfaultfd }
                if result < 0 { throw AttachError.userfaultfdRefused(pid: pid, errno: Int32(-result)) }
                let remoteFD = Int32(result)
                defer { _ = try? remote.call(Int(ferry_syscall_number_close()), UInt64(remoteFD)) }
                // Through the borrowed thread when the leader has exited (ThreadGroup.swift).
                switch ThreadGroup.copyDescriptor(remoteFD, of: pid, through: remote.tid) {
                case .success(let local):
                    return local
                case .failure(let error):
                    if error.operation == "pidfd_getfd" && error.errno == EPERM {
                        throw AttachError.permissionDenied(pid: pid, operation: "pidfd_getfd")
                    }
                    throw AttachError.system(pid: pid, step: error.operation, underlying: "\(error)")
                }
            } }
        } catch let error as FreezeError {
            switch error {
            case .processGone: throw AttachError.processExited(pid: pid)
            case .system(let system) where system.errno == EPERM:
                throw AttachError.permissionDenied(pid: pid, operation: system.operation)
            case .system(let system):
                throw AttachError.system(pid: pid, step: "freezing for the remote system call", underlying: "\(system)")
            }
        } catch let error as RemoteSyscallError {
            if case .processGone = error { throw AttachError.processExited(pid: pid) }
            throw AttachError.system(pid: pid, step: "remote system call", underlying: "\(error)")
        }
    }

    // MARK: - State

    public var regions: [Region] { state.withLock { $0.regions } }
    public var unprotectable: [Region] { state.withLock { $0.unprotectable } }
    public var isFrozen: Bool { state.withLock { $0.frozen != nil } }
    public var isTracking: Bool { state.withLock { $0.tracking } }
    /// How long the last `freeze()` took.
    public var lastFreezeLatency: Duration? { state.withLock { $0.lastFreezeLatency } }

    /// Runs one public operation: refuses it after `detach()`, and turns
    /// failures into a `TrackedProcessError` that names the operation, unless
    /// they already speak for themselves (page reader, attach errors).
    private func perform<T>(_ operation: String, _ body: () throws -> T) throws -> T {
        if state.withLock({ $0.detached }) { throw TrackedProcessError.detached(pid: pid, operation: operation) }
        do {
            return try body()
        } catch let error as TrackedProcessError {
            throw error
        } catch let error as PageReaderError {
            if case .noSuchProcess = error { throw TrackedProcessError.processExited(pid: pid, operation: operation) }
            throw error
        } catch {
            if processIsGone { throw TrackedProcessError.processExited(pid: pid, operation: operation) }
            if let error = error as? AttachError { throw error }
            throw TrackedProcessError.failed(pid: pid, operation: operation, underlying: "\(error)")
        }
    }

    /// True when the process no longer exists or is a zombie: no thread of
    /// it runs (a zombie leader whose other threads run on is alive).
    private var processIsGone: Bool {
        ThreadGroup.liveThread(of: pid) == nil
    }

    // MARK: - Tracking

    /// Write-protects every migrate region. Regions the kernel refuses are
    /// listed in `unprotectable` and reported dirty by every scan.
    public func startTracking() throws {
        try perform("start tracking") { try startTrackingLocked() }
    }

    private func startTrackingLocked() throws {
        try scanLock.withLock { _ in
            if state.withLock({ $0.tracking }) { return }
            let current = try ProcessMaps.read(pid: pid)
            var registered: [AddressRange] = []
            var refused: [Region] = []
            for region in current where region.kind == .migrate && region.range.length > 0 {
                do {
                    try tracker.track(region.range, pageSize: region.pageSize)
                    registered.append(region.range)
                } catch {
                    refused.append(region)
                }
            }
            state.withLock { state in
                state.regions = current
                state.unprotectable = refused
                state.tracked = Ranges.merge(registered)
                state.pendingDirty = []
                state.tracking = true
            }
        }
    }

    /// Pages written since the last scan or since they were last read, plus
    /// new or grown parts found by `refreshLayout`, plus every unprotectable
    /// region. Merged, ascending.
    ///
    /// With `rearm` (exact write sets per interval, as `seeder track` counts
    /// them) the reported pages are protected again. Without it they stay
    /// writable and are reported again until `read` re-arms them: the
    /// process pays one write fault per page per copy sent rather than per
    /// scan (see DirtyTracker.swift).
    public func scanDirty(rearm: Bool = true) throws -> [AddressRange] {
        try perform("scan the dirty pages of") { try scanDirtyLocked(rearm: rearm) }
    }

    private func scanDirtyLocked(rearm: Bool) throws -> [AddressRange] {
        try scanLock.withLock { _ in
            let (ranges, isTracking) = state.withLock { ($0.tracked, $0.tracking) }
            guard isTracking else { return [] }
            let scan = try tracker.scan(ranges, rearm: rearm)
            // A dead process's page tables are gone and a scan of them finds
            // nothing: that must not read as "clean".
            if processIsGone { throw TrackedProcessError.processExited(pid: pid, operation: "scan the dirty pages of") }
            var extra: [AddressRange] = []
            if !scan.lost.isEmpty {
                // The mapping under these addresses was replaced: register what is there now.
                extra += try retrack(scan.lost)
            }
            return state.withLock { state in
                let others = extra + state.pendingDirty + state.unprotectable.map(\.range)
                let result = others.isEmpty ? scan.dirty : Ranges.merge(scan.dirty + others)
                state.pendingDirty = []
                return result
            }
        }
    }

    /// Registers the migrate parts of `ranges` again; returns them (dirty in full).
    private func retrack(_ ranges: [AddressRange]) throws -> [AddressRange] {
        let current = try ProcessMaps.read(pid: pid)
        var newlyTracked: [AddressRange] = []
        var refused: [Region] = []
        for region in current where region.kind == .migrate {
            for piece in Self.pieces(of: region, in: Ranges.merge(ranges)) {
                do { try tracker.track(piece, pageSize: region.pageSize); newlyTracked.append(piece) } catch { refused.append(region) }
            }
        }
        state.withLock { state in
            state.tracked = Ranges.merge(Ranges.subtract(state.tracked, Ranges.merge(ranges)) + newlyTracked)
            state.unprotectable += refused
        }
        return Ranges.merge(ranges + newlyTracked)
    }

    /// The parts of `region` inside `ranges` (merged), as the tracker must
    /// register them: whole pages of the region's size (a hugetlb region is
    /// aligned to its pages, so rounding outwards stays inside it).
    private static func pieces(of region: Region, in ranges: [AddressRange]) -> [AddressRange] {
        let inside = Ranges.intersect([region.range], ranges)
        guard region.isHugetlb else { return inside }
        return Ranges.merge(inside.map { $0.aligned(outwardTo: region.pageSize) })
    }

    /// Re-arms protection on `ranges` before copying them, then reads them in
    /// order into `buffer`; returns the bytes read. A write that races the
    /// read is reported by a later scan. Safe to call from several threads.
    public func read(_ ranges: [AddressRange], into buffer: UnsafeMutableRawBufferPointer) throws -> Int {
        try perform("read the memory of") { try readUnlocked(ranges, into: buffer) }
    }

    /// Like `read`, but ranges that no longer exist (unmapped since the last
    /// layout) are reported in the result, zero-filled in the buffer, instead
    /// of failing the call with `PageReaderError.vanished`.
    public func readReporting(_ ranges: [AddressRange], into buffer: UnsafeMutableRawBufferPointer) throws -> PageReadResult {
        try perform("read the memory of") {
            try rearm(ranges)
            return try reader.readReporting(ranges, into: buffer)
        }
    }

    private func readUnlocked(_ ranges: [AddressRange], into buffer: UnsafeMutableRawBufferPointer) throws -> Int {
        try rearm(ranges)
        return try reader.read(ranges, into: buffer)
    }

    /// Re-protects the tracked parts of `ranges` before they are copied.
    /// Only whole pages count as sent: a partly read page keeps its dirty
    /// state, since re-protecting it would hide writes to the part not copied.
    ///
    /// In a hugetlb region a page is a huge page: only the huge pages that
    /// `ranges` cover whole are re-protected. A huge page read in part is
    /// reported dirty in full by the next scan (`pendingDirty`), since the
    /// copy of its other part, made earlier, may be stale and nothing
    /// watches it: the caller marks the part it read sent, and the next
    /// scan, which cannot come before that (the seeder holds its read lock
    /// across both), takes it back. Readers that want hugetlb pages to turn
    /// clean read them whole.
    private func rearm(_ ranges: [AddressRange]) throws {
        let (trackedNow, isTracking, regions) = state.withLock { ($0.tracked, $0.tracking, $0.regions) }
        guard isTracking else { return }
        var whole = Ranges.merge(ranges.compactMap { $0.aligned(inwardTo: pageSize) })
        var partial: [AddressRange] = []
        for region in regions where region.isHugetlb && region.kind == .migrate {
            let inside = Ranges.intersect(whole, [region.range])
            guard !inside.isEmpty else { continue }
            let aligned = inside.compactMap { $0.aligned(inwardTo: region.pageSize) }
            partial += Ranges.subtract(inside, aligned).map { $0.aligned(outwardTo: region.pageSize) }
            whole = Ranges.merge(Ranges.subtract(whole, [region.range]) + aligned)
        }
        let rearm = Ranges.intersect(whole, trackedNow)
        if !rearm.isEmpty { try tracker.rearm(rearm) }
        let stale = Ranges.intersect(Ranges.merge(partial), trackedNow)
        if !stale.isEmpty { state.withLock { $0.pendingDirty = Ranges.merge($0.pendingDirty + stale) } }
    }

    /// Re-reads the maps. New and grown migrate parts are registered and
    /// reported dirty in full by the next scan; vanished parts are forgotten.
    public func refreshLayout() throws -> LayoutChange {
        try perform("re-read the layout of") { try refreshLayoutLocked() }
    }

    private func refreshLayoutLocked() throws -> LayoutChange {
        try scanLock.withLock { _ in
            let current = try ProcessMaps.read(pid: pid)
            let (old, isTracking, trackedNow, refusedNow) = state.withLock {
                ($0.regions, $0.tracking, $0.tracked, $0.unprotectable.map(\.range))
            }
            var change = LayoutChange.diff(old: old, new: current)
            if isTracking {
                // Migratable memory that nothing tracks is dirty in full, even
                // where the diff sees no change: a scan that found a replaced
                // mapping may have re-registered it while it was briefly
                // unmapped, and an anonymous mapping put back at the same
                // address looks unchanged to the diff.
                let coverage = Ranges.merge(current.filter { $0.kind == .migrate }.map(\.range))
                let untracked = Ranges.subtract(coverage, Ranges.merge(trackedNow + refusedNow))
                if !untracked.isEmpty {
                    change.newlyDirty = Ranges.merge(change.newlyDirty + untracked)
                }
            }
            var newlyTracked: [AddressRange] = []
            var refused: [Region] = []
            if isTracking && !change.newlyDirty.isEmpty {
                for region in current where region.kind == .migrate {
                    for piece in Self.pieces(of: region, in: change.newlyDirty) {
                        do { try tracker.track(piece, pageSize: region.pageSize); newlyTracked.append(piece) } catch { refused.append(region) }
                    }
                }
            }
            state.withLock { state in
                state.regions = current
                if isTracking {
                    let gone = change.unmapped
                    state.tracked = Ranges.merge(Ranges.subtract(state.tracked, gone) + newlyTracked)
                    // Keep refusals that still exist, plus the new ones.
                    let stillMapped = current.filter { $0.kind == .migrate }.map(\.range)
                    state.unprotectable = state.unprotectable.compactMap { region in
                        Ranges.intersect([region.range], Ranges.merge(stillMapped)).isEmpty ? nil : region
                    } + refused
                    state.pendingDirty = Ranges.merge(state.pendingDirty + change.newlyDirty)
                }
            }
            return change
        }
    }

    /// Stops write-protection; the process stays attached (uffd open) and may
    /// be tracked again with `startTracking()`.
    public func stopTracking() throws {
        scanLock.withLock { _ in
            let ranges: [AddressRange] = state.withLock { state in
                defer { state.tracked = []; state.tracking = false; state.pendingDirty = [] }
                return state.tracking ? state.tracked : []
            }
            for range in ranges { try? tracker.untrack(range) }
        }
    }

    // MARK: - Freeze

    /// Stops every thread of the process; returns how long it took. Freezing
    /// a frozen process does nothing and returns zero.
    @discardableResult
    public func freeze() throws -> Duration {
        try perform("freeze") {
            if isFrozen { return .zero }
            do {
                let state = try ptrace.run { try Freezer.freeze(pid: pid) }
                self.state.withLock { now in
                    now.frozen = state
                    now.lastFreezeLatency = state.latency
                    now.signalStopsSeen += state.signalStops
                }
                return state.latency
            } catch let error as FreezeError {
                switch error {
                case .processGone: throw TrackedProcessError.processExited(pid: pid, operation: "freeze")
                case .system(let system) where system.errno == EPERM:
                    throw AttachError.permissionDenied(pid: pid, operation: system.operation)
                case .system(let system):
                    throw TrackedProcessError.failed(pid: pid, operation: "freeze", underlying: "\(system)")
                }
            }
        }
    }

    /// Lets every thread run again exactly as it was (a process stopped before
    /// the freeze stays stopped; signals caught by the freeze are delivered).
    public func thaw() throws {
        guard let frozen = state.withLock({ $0.frozen }) else { return }
        try ptrace.run { try Freezer.thaw(frozen) }
        state.withLock { $0.frozen = nil }
    }

    // MARK: - Detach

    /// Stops tracking, closes the userfaultfd and thaws the process if frozen;
    /// the process runs on unaffected. Calling it again does nothing.
    public func detach() throws {
        if state.withLock({ $0.detached }) { return }
        var firstError: Error?
        do { try stopTracking() } catch { firstError = error }
        tracker.close()
        do { try thaw() } catch { if firstError == nil { firstError = error } }
        ptrace.stop()
        state.withLock { $0.detached = true }
        if let firstError { throw firstError }
    }
}
