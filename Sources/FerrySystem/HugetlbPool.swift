// The kernel's pools of huge pages, one per huge page size: what post-copy
// into live memory maps hugetlb regions from.
//
// Why: hugetlb memory never comes from the general allocator. A private
// MAP_HUGETLB mapping reserves its pages from the pool of its size when it is
// made, and fails with ENOMEM when the pool has too few; the leecher maps the
// migrated regions only after the source is frozen, so it reads the pool
// first, while a refusal still leaves the source untouched.
//
// Each pool is a directory /sys/kernel/mm/hugepages/hugepages-<size>kB with
// free_hugepages (free, reserved ones included), resv_hugepages (promised to
// mappings, not yet faulted), nr_overcommit_hugepages and surplus_hugepages
// (pages the kernel may add beyond the pool on demand, and those it has).
// Kernel: 2.6.27+. Capability: none to read.
#if canImport(Glibc)
import Glibc
import FerryToolkit
#endif

public enum HugetlbPool {
    /// Huge pages of `pageSize` bytes a new private mapping can still
    /// reserve: free and unreserved, plus what overcommit may add. nil when
    /// the kernel has no pool of that size or it cannot be read.
    public static func available(pageSize: UInt64) -> Int? {
        let directory = "/sys/kernel/mm/hugepages/hugepages-\(pageSize >> 10)kB/"
        guard let free = readNumber(directory + "free_hugepages"),
              let reserved = readNumber(directory + "resv_hugepages") else { return nil }
        let overcommit = readNumber(directory + "nr_overcommit_hugepages") ?? 0
        let surplus = readNumber(directory + "surplus_hugepages") ?? 0
        return max(0, free - reserved) + max(0, overcommit - surplus)
    }

    private static func readNumber(_ path: String) -> Int? {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return nil }
        defer { close(fd) }
        var buffer = [UInt8](repeating: 0, count: 32)
        let count = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
        guard count > 0 else { return nil }
        let text = String(decoding: buffer[0..<count], as: UTF8.self)
        return text.split(whereSeparator: { $0 == "\n" || $0 == " " }).first.flatMap { Int($0) }
    }
}
