// The hub's copy of the pages it pulled from upstream: memory up to a bound,
// a spill file past it (PageSlots), and the version each page was fetched
// at. Each page keeps one slot for its whole life, so a re-fetched page
// overwrites itself and the cache never grows past the source's size.
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

final class PageCache: Sendable {
    /// What the cache holds for one page, and the version it was fetched at.
    struct Entry {
        var version: UInt32
        fileprivate var slot: PageSlots.Entry
        /// All zero: served as a zero run.
        var zero: Bool { slot.content != .data }
        /// Mapped upstream, but nothing backs it (past the end of its file):
        /// served as a hole run, so the destination raises SIGBUS there too.
        var hole: Bool { slot.content == .hole }
    }

    private struct Storage: ~Copyable {
        var slots: PageSlots
        var versions: [UInt64: UInt32] = [:]
        /// Pages upstream answered "unmapped" for since: nothing to serve
        /// (the slot stays the page's, for when its address is mapped again).
        var gone: Set<UInt64> = []
    }

    private let storage: Mutex<Storage>
    private let spillPath: String

    /// Bytes held in memory and on disk, for statistics.
    var memoryBytes: Int { storage.withLock { $0.slots.memoryBytes } }
    var diskBytes: Int { storage.withLock { $0.slots.diskBytes } }
    var count: Int { storage.withLock { $0.versions.count } }

    init(memoryLimit: Int, spillDirectory: String) {
        spillPath = spillDirectory + "/ferry-hub-spill-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        do {
            storage = Mutex(Storage(slots: try PageSlots(memoryBytes: UInt64(max(0, memoryLimit)), spillPath: spillPath)))
        } catch {
            // With a spill file named, a failed reservation only sends every page to the file.
            preconditionFailure("PageSlots with a spill file cannot fail to start: \(error)")
        }
    }

    func entry(_ page: UInt64) -> Entry? {
        storage.withLock { s in
            guard !s.gone.contains(page), let version = s.versions[page], let slot = s.slots.entry(page) else { return nil }
            return Entry(version: version, slot: slot)
        }
    }

    /// The page's memory is gone upstream: its copy must not be served.
    func forget(_ page: UInt64) {
        storage.withLock { s in
            if s.versions[page] != nil { s.gone.insert(page) }
        }
    }

    /// Stores one page fetched at `version`: its bytes, or nil for an
    /// all-zero page or (`hole`) a page nothing backs.
    func store(_ page: UInt64, version: UInt32, data: UnsafeRawBufferPointer?, hole: Bool = false) throws {
        // The address crosses into the lock as a number: the bytes are read
        // inside this call, under the lock, and not kept.
        let address = data.map { UInt(bitPattern: $0.baseAddress) }
        let failure: String? = storage.withLock { s in
            if let address {
                do {
                    // SAFETY: `address` is `data`'s, valid for this call.
                    try s.slots.store(page, data: UnsafeRawPointer(bitPattern: address)!)
                } catch {
                    return "\(error)"
                }
            } else {
                s.slots.mark(page, hole ? .hole : .zero)
            }
            s.versions[page] = version
            s.gone.remove(page)
            return nil
        }
        if let failure { throw MigrationError.image("the hub cannot write its spill file \(spillPath): \(failure)") }
    }

    /// Copies a cached page into `destination`; false when it is all zero
    /// (nothing copied) — the caller sends it as a zero run.
    func load(_ entry: Entry, into destination: UnsafeMutableRawPointer) throws -> Bool {
        // The address crosses into the lock as a number: the page is written
        // inside this call, under the lock, and not kept.
        let address = UInt(bitPattern: destination)
        let outcome: Result<Bool, MigrationError> = storage.withLock { s in
            do {
                // SAFETY: `address` is `destination`'s, valid for this call.
                return .success(try s.slots.load(entry.slot, into: UnsafeMutableRawPointer(bitPattern: address)!))
            } catch {
                return .failure(MigrationError.image("the hub cannot read its spill file \(spillPath): \(error)"))
            }
        }
        return try outcome.get()
    }
}
