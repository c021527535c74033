// The hub's copy of the pages it pulled from upstream: memory up to a bound,
// a spill file past it. Each page keeps one slot for its whole life, so a
// re-fetched page overwrites itself and the cache never grows past the
// source's size. Not thread-safe: the hub calls it under its lock.
import Foundation
#if canImport(Glibc)
import Glibc
#endif

// @unchecked Sendable: the hub touches a cache only while holding the lock
// that sits beside it (`HubMigration.cacheLock`).
final class PageCache: @unchecked Sendable {
    /// What the cache holds for one page, and the version it was fetched at.
    struct Entry {
        var version: UInt32
        /// >= 0 memory slot, < -1 disk slot (-slot - 2), -1 none yet. A page
        /// keeps its slot when it turns all-zero, so churn between zero and
        /// data never allocates a second slot for the same page.
        var slot: Int32
        var zero: Bool
        /// Mapped upstream, but nothing backs it (past the end of its file):
        /// served as a hole run, so the destination raises SIGBUS there too.
        var hole = false
        /// Upstream answered "unmapped" since: nothing to serve (the slot
        /// stays the page's, for when its address is mapped again).
        var gone = false
    }

    private var entries: [UInt64: Entry] = [:]
    private var memory: UnsafeMutableRawPointer?
    private let memorySlots: Int
    private var nextMemorySlot = 0
    private var nextDiskSlot = 0
    private let spillPath: String
    private var spill: Int32 = -1

    /// Bytes held in memory and on disk, for statistics.
    var memoryBytes: Int { nextMemorySlot * Int(pageSize) }
    var diskBytes: Int { nextDiskSlot * Int(pageSize) }
    var count: Int { entries.count }

    init(memoryLimit: Int, spillDirectory: String) {
        let wanted = max(0, memoryLimit / Int(pageSize))
        // SAFETY: reserved address space only; pages are committed as slots
        // are first written, and the mapping lives as long as the cache.
        let mapped = wanted == 0 ? MAP_FAILED : mmap(nil, wanted * Int(pageSize), PROT_READ | PROT_WRITE,
                                                      MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
        // Without the reservation every page goes to the spill file.
        memory = mapped == MAP_FAILED ? nil : mapped
        memorySlots = memory == nil ? 0 : wanted
        spillPath = spillDirectory + "/ferry-hub-spill-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
    }

    deinit {
        if let memory { munmap(memory, memorySlots * Int(pageSize)) }
        if spill >= 0 {
            close(spill)
        }
    }

    func entry(_ page: UInt64) -> Entry? { entries[page].flatMap { $0.gone ? nil : $0 } }

    /// The page's memory is gone upstream: its copy must not be served.
    func forget(_ page: UInt64) {
        entries[page]?.gone = true
    }

    /// Stores one page fetched at `version`: its bytes, or nil for an
    /// all-zero page or (`hole`) a page nothing backs.
    func store(_ page: UInt64, version: UInt32, data: UnsafeRawBufferPointer?, hole: Bool = false) throws {
        var slot = entries[page]?.slot ?? -1
        guard let data else {
            entries[page] = Entry(version: version, slot: slot, zero: true, hole: hole)
            return
        }
        if slot == -1 {
            if nextMemorySlot < memorySlots {
                slot = Int32(nextMemorySlot)
                nextMemorySlot += 1
            } else {
                try openSpill()
                slot = -Int32(nextDiskSlot) - 2
                nextDiskSlot += 1
            }
        }
        if slot >= 0 {
            (memory! + Int(slot) * Int(pageSize)).copyMemory(from: data.baseAddress!, byteCount: Int(pageSize))
        } else {
            let offset = off_t(-(Int(slot) + 2)) * off_t(pageSize)
            guard pwrite(spill, data.baseAddress!, Int(pageSize), offset) == Int(pageSize) else {
                throw MigrationError.image("the hub cannot write its spill file \(spillPath): \(String(cString: strerror(errno)))")
            }
        }
        entries[page] = Entry(version: version, slot: slot, zero: false)
    }

    /// Copies a cached page into `destination`; false when it is all zero
    /// (nothing copied) — the caller sends it as a zero run.
    func load(_ entry: Entry, into destination: UnsafeMutableRawPointer) throws -> Bool {
        if entry.zero || entry.slot == -1 { return false }
        if entry.slot >= 0 {
            destination.copyMemory(from: memory! + Int(entry.slot) * Int(pageSize), byteCount: Int(pageSize))
        } else {
            let offset = off_t(-(Int(entry.slot) + 2)) * off_t(pageSize)
            guard pread(spill, destination, Int(pageSize), offset) == Int(pageSize) else {
                throw MigrationError.image("the hub cannot read its spill file \(spillPath): \(String(cString: strerror(errno)))")
            }
        }
        return true
    }

    private func openSpill() throws {
        guard spill < 0 else { return }
        spill = open(spillPath, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0o600)
        guard spill >= 0 else {
            throw MigrationError.image("the hub cannot create its spill file \(spillPath): \(String(cString: strerror(errno)))")
        }
        // Unlinked at once: the pages are secret and must not outlive the hub.
        unlink(spillPath)
    }
}
