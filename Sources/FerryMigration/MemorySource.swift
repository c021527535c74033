// What the seeder needs from the process it serves. `TrackedProcess` (the
// real memory engine) is the one implementation in the product; tests inject
// their own (a source that reads slowly, wrongly or counts its calls) through
// `SeederService`'s initializer. The hub does not use it: it serves from its
// cache and its upstream (HubUpstream.swift).

/// What to do with the source process once the destination confirms.
public enum ThenAction: String, Sendable, CaseIterable {
    /// Leave it stopped (SIGSTOP), detached: it can be killed or resumed by hand.
    case stop
    /// Kill it.
    case kill
    /// Let it run on.
    case resume
}

public protocol MemorySource: AnyObject, Sendable {
    var pid: Int32 { get }
    var trackerName: String { get }
    /// The layout at the last refresh.
    var regions: [Region] { get }
    /// Migratable regions that could not be write-protected: always dirty.
    var unprotectable: [Region] { get }
    func startTracking() throws
    /// Pages written since they were last read (each at least once; a page
    /// may be reported again by later scans until it is read).
    func scanWrittenSinceRead() throws -> [AddressRange]
    /// Reads `ranges` into `buffer` in order, re-arming tracking first.
    /// Returns the sub-ranges that are no longer mapped (their bytes are undefined).
    /// Blocks (process_vm_readv): the seeder calls it off the cooperative pool.
    func readPages(_ ranges: [AddressRange], into buffer: UnsafeMutableRawBufferPointer) throws -> [AddressRange]
    func refreshLayout() throws -> LayoutChange
    func freeze() throws -> Duration
    func thaw() throws
    /// Ends tracking and lets go of the process, applying `then`.
    func release(then: ThenAction) throws
}

#if canImport(Glibc)
import Glibc
#endif

extension TrackedProcess: MemorySource {
    public var trackerName: String { trackerKind.rawValue }

    /// The seeder watches a page only while the leecher holds a copy of it:
    /// reads re-arm, scans do not, so rescanning costs the process nothing.
    public func scanWrittenSinceRead() throws -> [AddressRange] {
        try scanDirty(rearm: false)
    }

    public func readPages(_ ranges: [AddressRange], into buffer: UnsafeMutableRawBufferPointer) throws -> [AddressRange] {
        try readReporting(ranges, into: buffer).vanished
    }

    public func release(then: ThenAction) throws {
        switch then {
        case .resume:
            try detach()
        case .stop:
            // Queued while the threads are held; delivered as a group stop the
            // moment they are let go, so the process never runs another instruction.
            kill(pid, SIGSTOP)
            try detach()
        case .kill:
            kill(pid, SIGKILL)
            try? detach()
        }
    }
}
