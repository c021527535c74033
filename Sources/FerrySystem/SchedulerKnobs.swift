// Scheduling and allocator knobs of the C shim, for the threads and
// buffers of a migration. The system-call helpers themselves live in
// FerryToolkit (SystemCall.swift).
internal import CFerryLinux
import FerryToolkit
#if canImport(Glibc)
import Glibc
#endif

/// Keeps glibc from returning freed large buffers to the kernel after each
/// use (`mallopt` thresholds): for programs that move many 1 MiB frames.
public func tuneAllocatorForBulkBuffers() {
    ferry_tune_malloc_for_bulk()
}

/// Lowers the calling thread's scheduling priority (nice value), for
/// background work that must yield to latency-sensitive work on small hosts.
public func lowerCurrentThreadPriority(nice: Int32 = 10) {
    _ = ferry_nice_this_thread(nice)
}

/// Asks the scheduler for a `slice` (nil: the default) for every thread of
/// `pid`, and so for the threads they create later (kernel 6.12+; older
/// kernels ignore it). With a short slice a thread that wakes, such as one
/// whose post-copy page just landed, preempts a busy thread at once instead
/// of at the end of that thread's slice. Returns how many threads took it.
@discardableResult
public func setSchedulerSlice(_ slice: Duration?, threadsOf pid: Int32) -> Int {
    let nanoseconds = slice.map { UInt64(max(0, $0.wholeNanoseconds)) } ?? 0
    guard let directory = opendir("/proc/\(pid)/task") else { return 0 }
    defer { closedir(directory) }
    var done = 0
    while let entry = readdir(directory) {
        let name = withUnsafeBytes(of: entry.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
        if let tid = Int32(name), ferry_set_slice(tid, nanoseconds) == 0 { done += 1 }
    }
    return done
}
