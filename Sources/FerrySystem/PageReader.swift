// Reads pages of another process into caller-provided memory.
//
// Why: the seeder serves pages of a live process. It reads them with pread
// on /proc/PID/mem, one call per contiguous run. process_vm_readv would take
// many scattered ranges per call, but it pins the pages it reads (FOLL_PIN),
// and pinning an anonymous page shared copy-on-write after fork() unshares
// it: reading a redis during BGSAVE, or a pre-forking server, made every page
// it read a private copy in the parent (measured: a child's 512 MiB of shared
// memory became 512 MiB of private dirty memory). /proc/PID/mem takes a page
// reference without pinning and changes no sharing. Measured here in one run
// (512 MiB, 2 cores): contiguous 1 MiB reads 4.5–5.3 GB/s with pread against
// 4.4 GB/s with process_vm_readv (1.6 GB/s while it unshares); scattered
// single pages 0.70–0.85 M pages/s against 1.3 M, both several times the
// secure link's ~0.17 M pages/s. Kernel: any. Capability: PTRACE_MODE_ATTACH
// over the target (same user without Yama restrictions, or root /
// CAP_SYS_PTRACE).
//
// Fallback: process_vm_readv, when /proc/PID/mem cannot be opened (a
// hardened /proc). /proc/PID/mem uses FOLL_FORCE, so it can also read pages
// the target has made PROT_NONE. A page that neither path can
// read no longer exists (unmapped, or the VMA shrank): it is zero-filled in
// the buffer and *reported* in `PageReadResult.vanished`, never passed off as
// a page of zeros, so the caller can treat the range as unmapped.
//
// A process whose main thread has exited is read through a live thread:
// /proc/PID/task/TID/mem and process_vm_readv(TID) (ThreadGroup.swift).
#if canImport(Glibc)
import Glibc
#endif
internal import CFerryLinux
import Synchronization
import FerryToolkit

/// The outcome of a read: how many bytes were laid out and which ranges could not be read.
public struct PageReadResult: Sendable, Equatable {
    /// Bytes written to the buffer: always the sum of the requested lengths.
    public var bytes: Int
    /// Ranges (page granular, merged, in request order) that no longer exist
    /// in the target. Their bytes in the buffer are zero and must not be used.
    public var vanished: [AddressRange]
}

/// Errors of `PageReader`. Each message names the pid and what to do.
public enum PageReaderError: Error, CustomStringConvertible, Sendable, Equatable {
    case noSuchProcess(pid: Int32)
    case permissionDenied(pid: Int32)
    /// The buffer cannot hold the requested ranges.
    case bufferTooSmall(needed: Int, available: Int)
    /// Some requested ranges no longer exist; the others were read (see `PageReadResult`).
    case vanished(pid: Int32, ranges: [AddressRange])
    /// Any other failure of the underlying system call.
    case system(SystemError)

    public var description: String {
        switch self {
        case .noSuchProcess(let pid):
            return "cannot read the memory of pid \(pid): no such process (it may have exited)"
        case .permissionDenied(let pid):
            return "cannot read the memory of pid \(pid): permission denied (run as root or grant CAP_SYS_PTRACE)"
        case .bufferTooSmall(let needed, let available):
            return "cannot read pages: the buffer holds \(available) bytes but the ranges need \(needed) (pass a larger buffer or fewer ranges)"
        case .vanished(let pid, let ranges):
            let list = ranges.prefix(4).map(\.description).joined(separator: ", ")
            return "cannot read \(ranges.count) range(s) of pid \(pid): no longer mapped (\(list)\(ranges.count > 4 ? ", …" : "")); re-read the layout"
        case .system(let error):
            return error.description
        }
    }
}

/// Reads pages of one process. Immutable after init, so one reader may be
/// used from several threads at once (each call keeps its iovecs on its own stack).
public final class PageReader: Sendable {
    public let pid: Int32
    /// /proc/PID/mem opened read-only, or -1 when it could not be opened.
    /// Owned by this reader: closed exactly once, in deinit.
    private let memFD: Int32
    /// The thread process_vm_readv names: the pid, or a live thread of it
    /// once its leader has exited; moved on when that thread ends.
    private let vmTarget: Atomic<Int32>

    /// Remote iovecs per process_vm_readv call: the kernel's UIO_MAXIOV.
    public static let maxIovecs = 1024
    /// Bytes per process_vm_readv call: the kernel silently truncates a
    /// transfer at MAX_RW_COUNT (just under 2 GiB); stay well below it.
    static let maxBatchBytes = 1 << 30

    /// Opens the reader. Fails when the process does not exist; a refused
    /// /proc/PID/mem only disables the fallback.
    public init(pid: Int32) throws {
        self.pid = pid
        vmTarget = Atomic(ThreadGroup.liveThread(of: pid) ?? pid)
        // The file holds the memory, not the thread: it stays readable when
        // the thread it was opened through exits while others run.
        let fd = ThreadGroup.openProcFile("mem", of: pid, flags: O_RDONLY).fd
        if fd < 0 {
            let error = errno
            if error == ENOENT || error == ESRCH { throw PageReaderError.noSuchProcess(pid: pid) }
            if kill(pid, 0) != 0 && errno == ESRCH { throw PageReaderError.noSuchProcess(pid: pid) }
            // EACCES/EPERM: process_vm_readv may still be allowed; it will say.
        }
        self.memFD = fd
    }

    deinit {
        if memFD >= 0 { close(memFD) }
    }

    /// Reads `ranges` back to back into `buffer`. Throws
    /// `PageReaderError.vanished` when some range no longer exists (the
    /// others are in the buffer, the vanished ones zero); use
    /// `readReporting` to get both without an error.
    @discardableResult
    public func read(_ ranges: [AddressRange], into buffer: UnsafeMutableRawBufferPointer) throws -> Int {
        let result = try readReporting(ranges, into: buffer)
        if !result.vanished.isEmpty { throw PageReaderError.vanished(pid: pid, ranges: result.vanished) }
        return result.bytes
    }

    /// Reads `ranges` back to back into `buffer` and reports the ranges that
    /// no longer exist instead of failing.
    public func readReporting(_ ranges: [AddressRange], into buffer: UnsafeMutableRawBufferPointer) throws -> PageReadResult {
        var needed: UInt64 = 0
        for range in ranges { needed += range.length }
        guard needed <= UInt64(buffer.count) else {
            throw PageReaderError.bufferTooSmall(needed: Int(clamping: needed), available: buffer.count)
        }
        guard needed > 0, let base = buffer.baseAddress else { return PageReadResult(bytes: 0, vanished: []) }

        var vanished: [AddressRange] = []
        var cursor = Cursor()
        // /proc/PID/mem when we have it (it never changes sharing); process_vm_readv otherwise.
        var useVMReadv = memFD < 0
        /// The maps, read at the first page that cannot be read, once per call.
        var layout: [Region]?
        try withUnsafeTemporaryAllocation(of: iovec.self, capacity: Self.maxIovecs) { remote in
            while cursor.rangeIndex < ranges.count {
                // Gather up to maxIovecs remote pieces starting at the cursor.
                var count = 0
                var batchBytes = 0
                var scan = cursor
                while count < Self.maxIovecs && scan.rangeIndex < ranges.count && batchBytes < Self.maxBatchBytes {
                    let range = ranges[scan.rangeIndex]
                    let length = min(range.length - scan.offset, UInt64(Self.maxBatchBytes - batchBytes))
                    if length > 0 {
                        let address = range.start + scan.offset
                        if count > 0, UInt64(UInt(bitPattern: remote[count - 1].iov_base)) + UInt64(remote[count - 1].iov_len) == address {
                            // Adjacent to the previous piece: one iovec, because the
                            // kernel takes the target's mmap lock and pins pages once
                            // per iovec (4 KiB iovecs cost about a third more).
                            remote[count - 1].iov_len += Int(length)
                        } else {
                            // SAFETY: `remote` has maxIovecs slots and count < maxIovecs.
                            remote[count] = iovec(iov_base: UnsafeMutableRawPointer(bitPattern: UInt(address)),
                                                  iov_len: Int(length))
                            count += 1
                        }
                        batchBytes += Int(length)
                    }
                    if scan.offset + length < range.length {
                        scan.offset += length // the batch is full mid-range
                    } else {
                        scan.rangeIndex += 1
                        scan.offset = 0
                    }
                }
                if count == 0 { break }
                let destination = base + cursor.bufferOffset
                var done = 0
                if useVMReadv {
                    switch try vmReadv(destination, batchBytes, remote, count) {
                    case .read(let n): done = n
                    case .refused: useVMReadv = false
                    }
                }
                if !useVMReadv {
                    done = try memRead(destination, remote, count)
                }
                cursor.advance(by: done, in: ranges)
                if done == batchBytes { continue }

                // Stopped short: settle the page at the cursor on its own.
                let range = ranges[cursor.rangeIndex]
                let address = range.start + cursor.offset
                let pageEnd = (address / pageSize + 1) * pageSize
                var unitLength = Int(min(pageEnd, range.end) - address)
                let unitDestination = base + cursor.bufferOffset
                var got = memReadOne(unitDestination, address: address, length: unitLength)
                if got < unitLength && !useVMReadv {
                    // /proc/PID/mem cannot wait for a userfaultfd: an unpopulated
                    // page under synchronous write-protection (a uffd-wp marker)
                    // fails it with EIO, where process_vm_readv lets the fault be
                    // handled. Such a page shares nothing, so pinning it is harmless.
                    got += vmReadvOne(unitDestination + got, address: address + UInt64(got), length: unitLength - got)
                }
                if got == 0 {
                    // Nothing here. When no mapping covers the address at all,
                    // the whole gap up to the next mapping is gone: settle it
                    // at once instead of two failing calls per page (a 1 GiB
                    // region unmapped since the last layout would take seconds).
                    if layout == nil { layout = (try? ProcessMaps.read(pid: pid)) ?? [] }
                    if let gapEnd = Self.unmappedEnd(at: address, in: layout!) {
                        unitLength = Int(min(gapEnd, range.end) - address)
                    }
                }
                if got < unitLength {
                    // SAFETY: the unit lies within the caller's buffer (checked `needed` above).
                    (unitDestination + got).initializeMemory(as: UInt8.self, repeating: 0, count: unitLength - got)
                    let lost = AddressRange(start: address + UInt64(got), end: address + UInt64(unitLength))
                    if let last = vanished.last, last.end == lost.start {
                        vanished[vanished.count - 1].end = lost.end
                    } else {
                        vanished.append(lost)
                    }
                    if kill(pid, 0) != 0 && errno == ESRCH { throw PageReaderError.noSuchProcess(pid: pid) }
                }
                cursor.advance(by: unitLength, in: ranges)
            }
        }
        return PageReadResult(bytes: Int(needed), vanished: vanished)
    }

    /// When no region covers `address`, the start of the next region above
    /// it (or the top of the address space); nil when a region covers it.
    static func unmappedEnd(at address: UInt64, in regions: [Region]) -> UInt64? {
        // Maps are sorted by address: find the first region ending above `address`.
        var low = 0, high = regions.count
        while low < high {
            let mid = (low + high) / 2
            if regions[mid].end <= address { low = mid + 1 } else { high = mid }
        }
        guard low < regions.count else { return UInt64.max }
        return regions[low].start <= address ? nil : regions[low].start
    }

    // MARK: - Paths

    /// Position in the request: which range, how far into it, and where in the buffer.
    private struct Cursor {
        var rangeIndex = 0
        var offset: UInt64 = 0
        var bufferOffset = 0

        mutating func advance(by bytes: Int, in ranges: [AddressRange]) {
            var left = UInt64(bytes)
            bufferOffset += bytes
            while left > 0 || (rangeIndex < ranges.count && offset == ranges[rangeIndex].length) {
                let remaining = ranges[rangeIndex].length - offset
                if left >= remaining {
                    left -= remaining
                    rangeIndex += 1
                    offset = 0
                } else {
                    offset += left
                    left = 0
                }
            }
        }
    }

    private enum VMReadvOutcome { case read(Int), refused }

    private func vmReadv(_ destination: UnsafeMutableRawPointer, _ length: Int,
                         _ remote: UnsafeMutableBufferPointer<iovec>, _ count: Int) throws -> VMReadvOutcome {
        var local = iovec(iov_base: destination, iov_len: length)
        while true {
            do {
                // SAFETY: `local` covers `length` bytes of the caller's buffer;
                // `remote` holds `count` initialized iovecs.
                return .read(try checkedCall("process_vm_readv", on: "pid \(pid)") {
                    ferry_process_vm_readv(vmTarget.load(ordering: .relaxed), &local, 1, remote.baseAddress, UInt(count))
                })
            } catch let error as SystemError {
                switch error.errno {
                case EFAULT: return .read(0) // the first byte is not readable: settled below
                case ESRCH:
                    if retarget() { continue }
                    throw PageReaderError.noSuchProcess(pid: pid)
                case EPERM, EACCES, ENOSYS:
                    // Refused (ptrace policy, seccomp, old kernel): try /proc/PID/mem.
                    if memFD < 0 { throw PageReaderError.permissionDenied(pid: pid) }
                    return .refused
                default:
                    throw PageReaderError.system(error)
                }
            }
        }
    }

    /// process_vm_readv of one range; the bytes read, 0 when it fails.
    private func vmReadvOne(_ destination: UnsafeMutableRawPointer, address: UInt64, length: Int) -> Int {
        var local = iovec(iov_base: destination, iov_len: length)
        var remote = iovec(iov_base: UnsafeMutableRawPointer(bitPattern: UInt(address)), iov_len: length)
        while true {
            do {
                // SAFETY: `local` covers `length` bytes of the caller's buffer.
                return try checkedCall("process_vm_readv", on: "pid \(pid)") {
                    ferry_process_vm_readv(vmTarget.load(ordering: .relaxed), &local, 1, &remote, 1)
                }
            } catch let error as SystemError where error.errno == ESRCH {
                if !retarget() { return 0 }
            } catch {
                return 0
            }
        }
    }

    /// After ESRCH: points process_vm_readv at another live thread of the
    /// process (the one it named has exited, or the leader did). False when
    /// no other thread runs.
    private func retarget() -> Bool {
        let current = vmTarget.load(ordering: .relaxed)
        guard let live = ThreadGroup.liveThread(of: pid), live != current else { return false }
        vmTarget.store(live, ordering: .relaxed)
        return true
    }

    /// Reads the iovecs in order through /proc/PID/mem; returns the bytes
    /// read before the first short read.
    private func memRead(_ destination: UnsafeMutableRawPointer, _ remote: UnsafeMutableBufferPointer<iovec>, _ count: Int) throws -> Int {
        if memFD < 0 { throw PageReaderError.permissionDenied(pid: pid) }
        var done = 0
        for i in 0..<count {
            let address = UInt64(UInt(bitPattern: remote[i].iov_base))
            let length = remote[i].iov_len
            let got = memReadOne(destination + done, address: address, length: length)
            done += got
            if got < length { break }
        }
        return done
    }

    /// pread from /proc/PID/mem until `length` bytes or the first failure.
    private func memReadOne(_ destination: UnsafeMutableRawPointer, address: UInt64, length: Int) -> Int {
        guard memFD >= 0 else { return 0 }
        var done = 0
        while done < length {
            // SAFETY: destination has `length` bytes of room in the caller's buffer.
            let n = (try? checkedCall("pread", on: "/proc/\(pid)/mem") {
                pread(memFD, destination + done, length - done, off_t(Int64(bitPattern: address + UInt64(done))))
            }) ?? 0
            guard n > 0 else { break } // EIO/EFAULT: not mapped
            done += n
        }
        return done
    }
}
