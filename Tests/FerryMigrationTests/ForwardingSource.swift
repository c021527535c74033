// A memory source that forwards everything to a tracked process; tests
// subclass it to change how pages are read (slowly, wrongly, counted).
import FerrySystem
@testable import FerryMigration

class ForwardingSource: MemorySource, @unchecked Sendable {
    // @unchecked: `inner` is thread-safe itself; subclasses state their own invariants.
    let inner: TrackedProcess
    init(_ inner: TrackedProcess) { self.inner = inner }

    var pid: Int32 { inner.pid }
    var trackerName: String { inner.trackerName }
    var regions: [Region] { inner.regions }
    var unprotectable: [Region] { inner.unprotectable }
    func startTracking() throws { try inner.startTracking() }
    func scanWrittenSinceRead() throws -> [AddressRange] { try inner.scanWrittenSinceRead() }
    func readPages(_ ranges: [AddressRange], into buffer: UnsafeMutableRawBufferPointer) throws -> [AddressRange] {
        try inner.readPages(ranges, into: buffer)
    }
    func refreshLayout() throws -> LayoutChange { try inner.refreshLayout() }
    func freeze() throws -> Duration { try inner.freeze() }
    func thaw() throws { try inner.thaw() }
    func release(then: ThenAction) throws { try inner.release(then: then) }
}
