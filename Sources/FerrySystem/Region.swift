// Address ranges and memory regions: the vocabulary every layer above
// FerrySystem speaks. Plain values, no kernel state.
import FerryToolkit

/// The page size Ferry works in. x86_64 and arm64 Linux as configured here use 4 KiB.
public let pageSize: UInt64 = 4096

/// A half-open range of virtual addresses `[start, end)`, page aligned.
public struct AddressRange: Hashable, Sendable, Codable, CustomStringConvertible {
    public var start: UInt64
    public var end: UInt64

    public init(start: UInt64, end: UInt64) {
        precondition(start <= end, "AddressRange start \(start) after end \(end)")
        self.start = start
        self.end = end
    }

    public var length: UInt64 { end - start }
    public var pageCount: UInt64 { length / pageSize }
    public func contains(_ address: UInt64) -> Bool { address >= start && address < end }

    public var description: String {
        "0x" + String(start, radix: 16) + "-0x" + String(end, radix: 16)
    }
}

/// What Ferry does with a mapping.
public enum RegionKind: String, Sendable, Codable {
    /// Private writable, or shared anonymous / memfd: contents are copied.
    case migrate
    /// Read-only file mapping: path and offset are recorded, contents are not copied.
    case recordOnly = "record"
    /// `[vvar]`, `[vsyscall]`, device mappings: recorded and skipped.
    case skip
}

/// One line of `/proc/PID/maps`, classified.
public struct Region: Hashable, Sendable, Codable {
    public var range: AddressRange
    /// The four permission characters of the maps line, for example `rw-p`.
    public var permissions: String
    public var offset: UInt64
    public var device: String
    public var inode: UInt64
    /// The path or pseudo-name (`[heap]`, `[stack]`), empty for anonymous memory.
    public var name: String
    public var kind: RegionKind
    /// The size of the pages the kernel maps this region with: `pageSize`
    /// (4 KiB) except for hugetlb memory (`MAP_HUGETLB`, `SHM_HUGETLB`,
    /// `MFD_HUGETLB`, hugetlbfs files), whose pages are 2 MiB or 1 GiB. The
    /// kernel write-protects, scans and maps such a region only in whole
    /// pages of this size (see `hugePages(within:)`).
    public var pageSize: UInt64

    public init(range: AddressRange, permissions: String, offset: UInt64, device: String,
                inode: UInt64, name: String, kind: RegionKind, pageSize: UInt64 = FerrySystem.pageSize) {
        self.range = range
        self.pageSize = pageSize
        self.permissions = permissions
        self.offset = offset
        self.device = device
        self.inode = inode
        self.name = name
        self.kind = kind
    }

    public var start: UInt64 { range.start }
    public var end: UInt64 { range.end }
    public var isWritable: Bool { permissions.dropFirst().first == "w" }
    public var isShared: Bool { permissions.last == "s" }
    /// True for hugetlb memory: pages larger than `FerrySystem.pageSize`.
    public var isHugetlb: Bool { pageSize > FerrySystem.pageSize }
}

extension AddressRange {
    /// The whole pages of `size` (a power of two) inside this range, or nil
    /// when none fits: what may be write-protected of a hugetlb region.
    public func aligned(inwardTo size: UInt64) -> AddressRange? {
        let start = (self.start + size - 1) & ~(size - 1)
        let end = self.end & ~(size - 1)
        return start < end ? AddressRange(start: start, end: end) : nil
    }

    /// This range rounded outwards to pages of `size` (a power of two).
    public func aligned(outwardTo size: UInt64) -> AddressRange {
        AddressRange(start: start & ~(size - 1), end: (end + size - 1) & ~(size - 1))
    }
}
