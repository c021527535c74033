// One slot of bytes per page, for the stores that keep page data by address
// while a page changes: the hub's page cache and the staging area of live
// memory. A page gets a slot the first time it holds data and keeps it for
// its whole life: data sent again overwrites it in place, and a page that
// turns all-zero (or a hole) keeps its slot for when data comes back, so
// churn never allocates a second slot for one page and the store never
// grows past the source's size. Slots live in an address-space reservation
// committed only as they are written, and, past it, in an unlinked spill file
// when one is named.
import FerryToolkit
#if canImport(Glibc)
import Glibc
#endif

/// Page slots: what each page holds, and its bytes.
///
/// Threading: not thread-safe; its owner serialises every call (the hub's
/// cache under its mutex, live memory before it hands the memory over).
struct PageSlots: ~Copyable {
    /// What a page holds.
    enum Content: Equatable {
        /// Bytes, in its slot.
        case data
        /// All zero: nothing stored.
        case zero
        /// Mapped in the source, but nothing backs it (past the end of its
        /// file): SIGBUS where it is touched.
        case hole
    }

    struct Entry {
        /// >= 0 memory slot, < -1 disk slot (-slot - 2), -1 none yet.
        var slot: Int32
        var content: Content
    }

    /// No slot left: the reservation is full and there is no spill file.
    struct Exhausted: Error {}

    private(set) var entries: [UInt64: Entry] = [:]
    private let memory: UnsafeMutableRawPointer?
    private let memorySlots: Int
    private var nextMemorySlot = 0
    private var nextDiskSlot = 0
    private let spillPath: String?
    private var spill: Int32 = -1

    /// Reserves `memoryBytes` of address space for slots (none if that fails
    /// and a spill file is named; else the error). `spillPath`: where slots
    /// go past the reservation; nil: nowhere (`Exhausted`).
    /// `forkable: false` keeps the reservation out of forked children.
    init(memoryBytes: UInt64, spillPath: String?, forkable: Bool = true) throws {
        let wanted = Int(memoryBytes / pageSize)
        // SAFETY: reserved address space only; pages are committed as slots
        // are first written, and the mapping lives as long as self.
        let mapped = wanted == 0 ? MAP_FAILED : mmap(nil, wanted * Int(pageSize), PROT_READ | PROT_WRITE,
                                                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
        if mapped == MAP_FAILED, spillPath == nil {
            throw SystemError(operation: "mmap", target: "a reservation of \(memoryBytes) bytes for page slots", errno: errno)
        }
        // Without the reservation every page goes to the spill file.
        memory = mapped == MAP_FAILED ? nil : mapped
        memorySlots = memory == nil ? 0 : wanted
        self.spillPath = spillPath
        if let memory, !forkable {
            // A fork (the post-copy guardian) would copy the page tables of
            // every slot written, and never reads them.
            _ = madvise(memory, memorySlots * Int(pageSize), MADV_DONTFORK)
        }
    }

    deinit {
        if let memory { munmap(memory, memorySlots * Int(pageSize)) }
        if spill >= 0 { close(spill) }
    }

    /// Bytes of slots used in memory and on disk.
    var memoryBytes: Int { nextMemorySlot * Int(pageSize) }
    var diskBytes: Int { nextDiskSlot * Int(pageSize) }

    func entry(_ page: UInt64) -> Entry? { entries[page] }

    /// Stores one page's bytes in its slot (allocated now if it has none).
    mutating func store(_ page: UInt64, data: UnsafeRawPointer) throws {
        var slot = entries[page]?.slot ?? -1
        if slot == -1 {
            if nextMemorySlot < memorySlots {
                slot = Int32(nextMemorySlot)
                nextMemorySlot += 1
            } else {
                guard let spillPath else { throw Exhausted() }
                try openSpill(spillPath)
                slot = -Int32(nextDiskSlot) - 2
                nextDiskSlot += 1
            }
        }
        if let address = address(ofSlot: slot) {
            // SAFETY: a memory slot is a page inside the reservation.
            address.copyMemory(from: data, byteCount: Int(pageSize))
        } else {
            let offset = off_t(-(Int(slot) + 2)) * off_t(pageSize)
            let spill = self.spill
            let wrote = try checkedCall("pwrite", on: spillPath ?? "") { pwrite(spill, data, Int(pageSize), offset) }
            guard wrote == Int(pageSize) else {
                throw SystemError(operation: "pwrite", target: spillPath ?? "", errno: ENOSPC)
            }
        }
        entries[page] = Entry(slot: slot, content: .data)
    }

    /// Records that `page` holds no bytes (`.zero` or `.hole`); its slot, if
    /// any, stays its own.
    mutating func mark(_ page: UInt64, _ content: Content) {
        precondition(content != .data, "data is stored with its bytes")
        entries[page] = Entry(slot: entries[page]?.slot ?? -1, content: content)
    }

    /// Copies a page's bytes into `destination`; false when it holds none
    /// (all zero, a hole, or never stored).
    func load(_ entry: Entry, into destination: UnsafeMutableRawPointer) throws -> Bool {
        guard entry.content == .data, entry.slot != -1 else { return false }
        if let address = address(ofSlot: entry.slot) {
            destination.copyMemory(from: address, byteCount: Int(pageSize))
        } else {
            let offset = off_t(-(Int(entry.slot) + 2)) * off_t(pageSize)
            let spill = self.spill
            let got = try checkedCall("pread", on: spillPath ?? "") { pread(spill, destination, Int(pageSize), offset) }
            guard got == Int(pageSize) else {
                throw SystemError(operation: "pread", target: spillPath ?? "", errno: EIO)
            }
        }
        return true
    }

    /// The address of a memory slot's bytes; nil for disk slots and none.
    func address(ofSlot slot: Int32) -> UnsafeMutableRawPointer? {
        guard slot >= 0, let memory else { return nil }
        return memory + Int(slot) * Int(pageSize)
    }

    private mutating func openSpill(_ path: String) throws {
        guard spill < 0 else { return }
        spill = try checkedCall("open", on: path) { open(path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0o600) }
        // Unlinked at once: the pages are secret and must not outlive their owner.
        unlink(path)
    }
}
