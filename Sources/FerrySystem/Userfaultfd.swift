// userfaultfd: the kernel's interface for user-space handling of page faults,
// used here for write-protection (uffd-WP) of a foreign process's memory.
//
// Why: a descriptor created inside the target (see RemoteSyscall.swift) and
// copied to us with pidfd_getfd lets us register the target's memory for
// write-protection, protect and unprotect pages, and read fault events, all
// from our own process, while the target runs.
// Kernel: uffd-WP on anonymous memory 5.7+, on shmem/hugetlbfs 5.19+,
// WP_UNPOPULATED 6.4+, WP_ASYNC and PAGEMAP_SCAN 6.7+.
// Capability: creating one needs CAP_SYS_PTRACE in the creating process or
// vm.unprivileged_userfaultfd=1 (UFFD_USER_MODE_ONLY works without either).
#if canImport(Glibc)
import Glibc
#endif
internal import CFerryLinux
import FerryToolkit
import Synchronization

/// Feature bits of UFFDIO_API that Ferry asks for.
struct UserfaultfdFeatures: OptionSet, Sendable, Hashable {
    let rawValue: UInt64
    init(rawValue: UInt64) { self.rawValue = rawValue }

    static let writeProtect = UserfaultfdFeatures(rawValue: ferry_uffd_feature_wp())
    static let wpHugetlbfsShmem = UserfaultfdFeatures(rawValue: ferry_uffd_feature_wp_hugetlbfs_shmem())
    static let wpUnpopulated = UserfaultfdFeatures(rawValue: ferry_uffd_feature_wp_unpopulated())
    static let wpAsync = UserfaultfdFeatures(rawValue: ferry_uffd_feature_wp_async())
    static let eventRemove = UserfaultfdFeatures(rawValue: ferry_uffd_feature_event_remove())
    static let eventUnmap = UserfaultfdFeatures(rawValue: ferry_uffd_feature_event_unmap())
    static let eventRemap = UserfaultfdFeatures(rawValue: ferry_uffd_feature_event_remap())
}

/// One message read from a userfaultfd.
enum UserfaultfdEvent: Equatable {
    /// A write to a write-protected page (address page aligned), or a missing-page fault.
    case pageFault(address: UInt64, writeProtect: Bool)
    /// MADV_DONTNEED / MADV_REMOVE dropped these pages.
    case remove(AddressRange)
    /// munmap removed these addresses.
    case unmap(AddressRange)
    /// mremap moved a range.
    case remap(from: UInt64, to: UInt64, length: UInt64)
    /// fork: the child's memory is on a new descriptor, now the reader's to close.
    case fork(child: Int32)
    case other(UInt8)
}

/// Owns one userfaultfd descriptor: closes it exactly once and lends it out
/// only inside `withDescriptor`, under a read lock, so it cannot be closed
/// (and its number reused) while an ioctl on it is running: `fd` is read
/// under the shared side of `lock` and set to -1 (in `close`) under its
/// exclusive side.
final class Userfaultfd: Sendable {
    private let fd: Atomic<Int32>
    /// Prefers readers: the sync tracker's handler reads events (shared)
    /// while it already holds the descriptor (shared).
    private let lock = ReadWriteLock(preferWriters: false)
    /// Names the target in errors: "pid 4242".
    let target: String

    /// Takes ownership of `fd`.
    init(adopting fd: Int32, target: String) {
        self.fd = Atomic(fd)
        self.target = target
    }

    deinit {
        close()
    }

    /// Closes the descriptor if still open. Closing unregisters every range and
    /// wakes every thread blocked on a fault of this descriptor.
    func close() {
        lock.exclusive {
            let open = fd.exchange(-1, ordering: .relaxed)
            if open >= 0 { Glibc.close(open) }
        }
    }

    /// Lends the descriptor to `body`; throws if it was already closed.
    @discardableResult
    func withDescriptor<T>(_ body: (Int32) throws -> T) throws -> T {
        try lock.shared {
            let fd = fd.load(ordering: .relaxed)
            guard fd >= 0 else {
                throw SystemError(operation: "userfaultfd", target: target, errno: EBADF, hint: "the tracker was stopped")
            }
            return try body(fd)
        }
    }

    /// UFFDIO_API: enables `features`; returns the features the kernel reports.
    func enable(_ features: UserfaultfdFeatures) throws -> UserfaultfdFeatures {
        var api = uffdio_api(api: ferry_uffd_api(), features: features.rawValue, ioctls: 0)
        try withDescriptor { fd in
            try checkedCall("UFFDIO_API", on: target) { ferry_uffdio_api(fd, &api) }
        }
        return UserfaultfdFeatures(rawValue: api.features)
    }

    /// UFFDIO_REGISTER in write-protect mode (and missing mode when asked).
    func register(_ range: AddressRange, missing: Bool = false) throws {
        var mode = ferry_uffdio_register_mode_wp()
        if missing { mode |= ferry_uffdio_register_mode_missing() }
        var request = uffdio_register(range: uffdio_range(start: range.start, len: range.length), mode: mode, ioctls: 0)
        try withDescriptor { fd in
            try checkedCall("UFFDIO_REGISTER", on: "\(target) at \(range)") { ferry_uffdio_register(fd, &request) }
        }
    }

    func unregister(_ range: AddressRange) throws {
        var request = uffdio_range(start: range.start, len: range.length)
        try withDescriptor { fd in
            try checkedCall("UFFDIO_UNREGISTER", on: "\(target) at \(range)") { ferry_uffdio_unregister(fd, &request) }
        }
    }

    /// UFFDIO_WRITEPROTECT: sets (`protect`) or clears protection. Clearing
    /// wakes threads blocked on the range unless `wake` is false.
    ///
    /// The kernel refuses with EAGAIN while the target's memory map is
    /// changing and the change's event (unmap, remove, remap) is not read yet.
    /// With `waitWhileBusy` the call is retried (the event reader, another
    /// thread, catches up within microseconds) for at most `busyLimit`; the
    /// event reader itself must pass false and retry after reading.
    func writeProtect(_ range: AddressRange, protect: Bool, wake: Bool = true, waitWhileBusy: Bool = true) throws {
        var mode: UInt64 = protect ? ferry_uffdio_writeprotect_mode_wp() : 0
        if !wake { mode |= ferry_uffdio_writeprotect_mode_dontwake() }
        var request = uffdio_writeprotect(range: uffdio_range(start: range.start, len: range.length), mode: mode)
        var attempts = 0
        while true {
            do {
                try withDescriptor { fd in
                    try checkedCall("UFFDIO_WRITEPROTECT", on: "\(target) at \(range)") { ferry_uffdio_writeprotect(fd, &request) }
                }
                return
            } catch let error as SystemError where error.errno == EAGAIN && waitWhileBusy && attempts < Self.busyRetries {
                attempts += 1
                usleep(attempts < 10 ? 0 : 100)
            }
        }
    }

    /// EAGAIN retries of `writeProtect`: 10 yields, then 100 µs sleeps, about 1 s in all (the reader is our own thread).
    static let busyRetries = 10_000

    /// UFFDIO_ZEROPAGE: resolves a missing-page fault with the zero page and wakes the faulting thread.
    func zeroPage(_ range: AddressRange) throws {
        var request = uffdio_zeropage(range: uffdio_range(start: range.start, len: range.length), mode: 0, zeropage: 0)
        try withDescriptor { fd in
            try checkedCall("UFFDIO_ZEROPAGE", on: "\(target) at \(range)") { ferry_uffdio_zeropage(fd, &request) }
        }
    }

    /// UFFDIO_WAKE: wakes threads waiting on faults in `range`.
    func wake(_ range: AddressRange) throws {
        var request = uffdio_range(start: range.start, len: range.length)
        try withDescriptor { fd in
            try checkedCall("UFFDIO_WAKE", on: "\(target) at \(range)") { ferry_uffdio_wake(fd, &request) }
        }
    }

    /// Reads the messages available now (the descriptor is non-blocking) into `events`.
    func readEvents(into events: inout [UserfaultfdEvent], max: Int = 64) throws {
        let stride = MemoryLayout<uffd_msg>.stride
        try withUnsafeTemporaryAllocation(of: uffd_msg.self, capacity: max) { messages in
            let count: Int = try withDescriptor { fd in
                switch try systemCall("read userfaultfd", on: target, {
                    // SAFETY: `messages` has room for `max` messages of `stride` bytes.
                    Glibc.read(fd, messages.baseAddress, max * stride)
                }) {
                case .done(let bytes): return bytes / stride
                case .wouldBlock: return 0
                }
            }
            for index in 0..<count {
                // SAFETY: the kernel initialized `count` messages.
                let message = messages.baseAddress! + index
                let event = ferry_uffd_msg_event(message)
                if event == ferry_uffd_event_pagefault() {
                    let flags = ferry_uffd_msg_pagefault_flags(message)
                    let address = ferry_uffd_msg_pagefault_address(message) & ~(pageSize - 1)
                    events.append(.pageFault(address: address, writeProtect: flags & ferry_uffd_pagefault_flag_wp() != 0))
                } else if event == ferry_uffd_event_remove() {
                    events.append(.remove(AddressRange(start: ferry_uffd_msg_remove_start(message), end: ferry_uffd_msg_remove_end(message))))
                } else if event == ferry_uffd_event_unmap() {
                    events.append(.unmap(AddressRange(start: ferry_uffd_msg_remove_start(message), end: ferry_uffd_msg_remove_end(message))))
                } else if event == ferry_uffd_event_remap() {
                    events.append(.remap(from: ferry_uffd_msg_remap_from(message), to: ferry_uffd_msg_remap_to(message),
                                         length: ferry_uffd_msg_remap_len(message)))
                } else if event == ferry_uffd_event_fork() {
                    events.append(.fork(child: ferry_uffd_msg_fork_ufd(message)))
                } else {
                    events.append(.other(event))
                }
            }
        }
    }

    /// A descriptor for our own process's memory (probes and tests); user-mode
    /// only when we lack the right to a full one.
    static func forOwnProcess() throws -> Userfaultfd {
        var fd = ferry_userfaultfd(O_CLOEXEC | O_NONBLOCK)
        if fd < 0 && errno == EPERM { fd = ferry_userfaultfd(O_CLOEXEC | O_NONBLOCK | ferry_uffd_user_mode_only()) }
        if fd < 0 { throw SystemError(operation: "userfaultfd", target: "our own process", errno: errno) }
        return Userfaultfd(adopting: fd, target: "our own process")
    }

    /// What the running kernel offers, probed with a descriptor of our own
    /// process (created and closed here). nil when the kernel has no userfaultfd.
    static func probeKernelFeatures() throws -> UserfaultfdFeatures? {
        let probe: Userfaultfd
        do { probe = try forOwnProcess() } catch let error as SystemError where error.errno == ENOSYS { return nil }
        return try probe.enable([])
    }
}
