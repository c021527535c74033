// Another process's memory as the kernel shows it, for comparing bytes.
import Glibc

/// `length` bytes of `pid`'s memory at `address`, read with pread on
/// /proc/PID/mem; nil when the kernel cannot read them all (unmapped, or a
/// page that raises SIGBUS: poisoned, or past the end of its file).
public func procMemory(pid: Int32, at address: UInt64, length: Int) -> [UInt8]? {
    let fd = open("/proc/\(pid)/mem", O_RDONLY | O_CLOEXEC)
    guard fd >= 0 else { return nil }
    defer { close(fd) }
    var bytes = [UInt8](repeating: 0, count: length)
    let n = bytes.withUnsafeMutableBytes { pread(fd, $0.baseAddress, length, off_t(Int64(bitPattern: address))) }
    return n == length ? bytes : nil
}
