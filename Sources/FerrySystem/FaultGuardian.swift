// The guardian of post-copy memory in another process: a small child process
// holding a second copy of the target's userfaultfd, so the registration
// outlives the leecher, and poisoning what never arrived if the leecher dies.
//
// Why: the target's own copy of the descriptor is closed (MissingFaultMemory+
// Process.swift), so the leecher holds the only one. Were it to die unasked
// (SIGKILL, the OOM killer, a crash), the kernel would drop the registration
// and every page that had not arrived would read as zeros on its first touch:
// wrong data, silently. With the guardian the descriptor stays open; the
// guardian sees the leecher's end as end of file on a pipe and resolves every
// missing page with UFFDIO_POISON, so the blocked and later touchers get
// SIGBUS. When post-copy ends in order the leecher dismisses the guardian,
// which exits at once: the registration never outlives post-copy.
//
// The guardian is a fork without exec that runs only system calls (C, in
// CFerryLinux's guardian.c). It knows the regions from its copy of the
// parent's memory, not which pages arrived: UFFDIO_POISON refuses present
// pages (EEXIST), so it poisons exactly the pages that are still empty
// (hugetlb memory in whole huge pages, the only unit the kernel takes).
// A page the program itself emptied after it arrived (MADV_DONTNEED), which
// would read zeros at the source too, then raises SIGBUS instead.
//
// Kernel: UFFDIO_POISON 6.6+, close_range 5.9+. Capability: none beyond the
// leecher's (the guardian only uses a descriptor it inherits).
#if canImport(Glibc)
import Glibc
#endif
internal import CFerryLinux
import FerryToolkit
import Synchronization

/// A guardian process. Dismiss it exactly once (`dismiss()`, or deinit).
public final class FaultGuardian: Sendable {
    /// The guardian's pid (in tests: to see it gone).
    public let pid: Int32
    /// The write end of the guardian's pipe, -1 once dismissed.
    private let control: Mutex<Int32>
    /// Whether the guardian was waited for; its lock also serializes the wait.
    private let reaped = Mutex(false)

    private init(pid: Int32, control: Int32) {
        self.pid = pid
        self.control = Mutex(control)
    }

    /// Forks a guardian over `ranges` (addresses in the descriptor's
    /// process, each with the size of the pages mapped there: it poisons
    /// hugetlb memory in whole huge pages).
    static func spawn(holding uffd: Userfaultfd, ranges: [(AddressRange, pageSize: UInt64)]) throws -> FaultGuardian {
        let bounds = ranges.flatMap { [$0.0.start, $0.0.end, $0.pageSize] }
        var control: Int32 = -1
        let pid = try uffd.withDescriptor { fd in
            // SAFETY: `bounds` holds 3 * ranges.count values for the call; the
            // child reads its own copy of them (fork), the parent none after.
            bounds.withUnsafeBufferPointer { ferry_guardian_spawn(fd, $0.baseAddress, ranges.count, &control) }
        }
        if pid < 0 {
            throw SystemError(operation: "starting the post-copy guardian (fork)", target: uffd.target, errno: errno,
                              hint: "the leecher could not fork: lower its memory or raise the process limit")
        }
        return FaultGuardian(pid: pid, control: control)
    }

    deinit { dismiss() }

    /// Tells the guardian post-copy ended in order (nothing to poison) and
    /// waits for it to exit, so its copy of the descriptor is closed when
    /// this returns. Only the first call acts.
    public func dismiss() {
        let fd: Int32 = control.withLock { control in
            defer { control = -1 }
            return control
        }
        guard fd >= 0 else { return }
        var byte: UInt8 = 0x44  // "D": any byte dismisses
        // A guardian that is gone already has nothing to be told.
        _ = try? checkedCall("write", on: "the post-copy guardian (pid \(pid))") { Glibc.write(fd, &byte, 1) }
        Glibc.close(fd)
        reap()
    }

    private func reap() {
        reaped.withLock { reaped in
            guard !reaped else { return }
            reaped = true
            var status: Int32 = 0
            // ECHILD: SIGCHLD ignored, the kernel reaped it already.
            _ = try? checkedCall("waitpid", on: "the post-copy guardian (pid \(pid))") { waitpid(pid, &status, 0) }
        }
    }
}
