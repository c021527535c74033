// The checks around live memory: before anything is pulled, that this
// host's huge page pools can hold the hugetlb regions; at the end, the
// BLAKE2b-256 of each migrated region as installed, to compare with the
// frozen source.
import FerryToolkit
#if canImport(Glibc)
import Glibc
#endif

extension LiveMemorySink {
    /// Checked when the leecher learns the layout (before pulling, so the
    /// source runs on untouched): the pool must have a free huge page of its
    /// size for each huge page of the hugetlb regions, or the mapping would
    /// fail only after the freeze. (The kernel's own reservation at mmap time
    /// is the final word; this is the early, friendly form of it.)
    static func checkHugePages(_ layout: [Region], pool: (UInt64) -> Int? = HugetlbPool.available(pageSize:)) throws {
        var needed: [UInt64: UInt64] = [:]
        for region in layout where region.kind == .migrate && region.isHugetlb {
            needed[region.pageSize, default: 0] += region.range.length / region.pageSize
        }
        for (size, count) in needed.sorted(by: { $0.key < $1.key }) {
            guard let free = pool(size), UInt64(max(0, free)) < count else { continue }
            let kib = size >> 10
            let regions = layout.filter { $0.kind == .migrate && $0.pageSize == size }
                .map { "\($0.range) (\($0.name.isEmpty ? "anonymous" : $0.name))" }
            throw MigrationError.badArgument(
                "post-copy into live memory needs \(count) free huge pages of \(kib) KiB for the hugetlb regions "
                + "\(regions.joined(separator: ", ")), and this host's pool has \(free): raise "
                + "/sys/kernel/mm/hugepages/hugepages-\(kib)kB/nr_hugepages by at least \(count - UInt64(max(0, free))) "
                + "(vm.nr_hugepages for the default size) and migrate again; nothing was frozen")
        }
    }

    /// The final layout as manifest entries, with the BLAKE2b-256 of each
    /// migrated region's installed bytes, to compare with the frozen source.
    /// `file` names the local address (there is no file). Throws unless
    /// every page is installed.
    func manifestRegions(layout: [Region]) throws -> [ManifestRegion] {
        guard let memory = activeMemory else { return [] }
        guard memory.isComplete, memory.failureReason == nil else {
            throw MigrationError.image(memory.failureReason.map { "\($0)" }
                                       ?? "post-copy ended with \(memory.totalPages - memory.installedPages) pages missing")
        }
        return try layout.map { region in
            var entry = ManifestRegion(start: region.start, end: region.end, prot: region.permissions, offset: region.offset,
                                       device: region.device, inode: region.inode, name: region.name,
                                       kind: region.kind.rawValue, file: nil, blake2b: nil)
            if region.isHugetlb { entry.pageSize = region.pageSize }
            if region.kind == .migrate, region.end > region.start, let local = memory.localAddress(of: region.start) {
                let holes = self.holes.ranges(from: region.start, to: region.end)
                entry.holes = holes.isEmpty ? nil : holes.map { [$0.start, $0.end] }
                // Hole pages raise SIGBUS here (and EIO through /proc): hashed as zeros, unread.
                let holeOffsets = holes.map { AddressRange(start: $0.start - region.start, end: $0.end - region.start) }
                entry.file = "memory:0x" + String(local, radix: 16)
                if let pid = options.targetPid {
                    entry.file = "pid \(pid) memory:0x" + String(local, radix: 16)
                }
                entry.blake2b = try Self.checksum(pid: options.targetPid, at: local, length: region.end - region.start,
                                                  holes: holeOffsets)
            }
            return entry
        }
    }

    /// BLAKE2b-256 of `length` bytes at `address`, in this process (`pid`
    /// nil) or in process `pid` through /proc, in steps of at most 1 MiB;
    /// the pages of `holes` (offsets from `address`) count as zeros.
    private static func checksum(pid: Int32?, at address: UInt64, length: UInt64, holes: [AddressRange]) throws -> String {
        var fd: Int32 = -1
        if let pid {
            // Through a live thread when the target's main thread has exited.
            let (opened, path) = ThreadGroup.openProcFile("mem", of: pid, flags: O_RDONLY)
            fd = opened
            guard fd >= 0 else {
                throw MigrationError.image("cannot open \(path) to check the migrated memory: \(SystemError(operation: "open", target: path, errno: errno))")
            }
        }
        defer { if fd >= 0 { close(fd) } }
        var hash = Blake2b256()
        var buffer = [UInt8](repeating: 0, count: 1 << 20)
        let zeros = [UInt8](repeating: 0, count: 1 << 20)
        var done: UInt64 = 0
        var nextHole = 0
        while done < length {
            while nextHole < holes.count, holes[nextHole].end <= done { nextHole += 1 }
            let inHole = nextHole < holes.count && holes[nextHole].start <= done
            let stop = inHole ? holes[nextHole].end : (nextHole < holes.count ? holes[nextHole].start : length)
            let want = Int(min(UInt64(buffer.count), stop - done))
            if inHole {
                zeros.withUnsafeBytes { hash.update(UnsafeRawBufferPointer(rebasing: $0[0..<want])) }
            } else if let pid {
                let got = buffer.withUnsafeMutableBytes { pread(fd, $0.baseAddress, want, off_t(Int64(bitPattern: address + done))) }
                guard got == want else {
                    throw MigrationError.image("cannot read pid \(pid)'s migrated memory at 0x\(String(address + done, radix: 16)) to check it")
                }
                buffer.withUnsafeBytes { hash.update(UnsafeRawBufferPointer(rebasing: $0[0..<want])) }
            } else {
                // SAFETY: the region is mapped here and every page of it
                // outside the holes installed (manifestRegions checked).
                hash.update(UnsafeRawBufferPointer(start: UnsafeRawPointer(bitPattern: UInt(address + done)), count: want))
            }
            done += UInt64(want)
        }
        return hash.finish().hexString
    }
}
