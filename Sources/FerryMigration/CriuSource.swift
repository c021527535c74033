// `seeder serve --with-criu` (issue 13, Protocols/criu.md § 2): the whole
// process moves, its memory by Ferry and everything else by CRIU. This
// source is the tracked process as Ferry pre-copies it, except at the
// freeze: instead of Ferry's ptrace freeze, `criu dump --lazy-pages` freezes
// and dumps the process and holds it in its post-dump hook, while the
// seeder takes the final dirty set as usual. (Ferry's userfaultfd is not in
// the target's descriptor table: the attach closes the target's copy right
// after taking it with pidfd_getfd, and ptrace is detached between
// freezes; so CRIU finds neither.) The end of the migration ends the dump:
// Complete lets CRIU kill the source, an abort of any kind (the leecher's,
// a signal, the grace period) makes CRIU resume it.
import Foundation
import FerryCRIU
import FerrySystem
import FerryToolkit
import Synchronization

/// RPC methods beyond MigrationMethod that a seeder may answer
/// (`SeederOptions.extraMethods`); only the session's owner may call them.
public protocol SeederExtraMethods: Sendable {
    func handles(_ method: UInt16) -> Bool
    /// The reply's parts, in order (the last one ends it).
    func handle(_ method: UInt16, _ payload: [UInt8]) async throws -> [[UInt8]]
}

/// Methods of the CRIU extension (Protocols/criu.md § 3).
public enum CriuMethod {
    /// After Finalize: CRIU's images (CriuImages bundle), in parts.
    public static let images: UInt16 = 0x0180
    /// Parts of the images reply.
    static let partBytes = 1 << 20
}

public final class CriuMemorySource: MemorySource, SeederExtraMethods {
    public let process: TrackedProcess
    public let dump: CriuDump
    private let dumped = Mutex(false)
    private let report: @Sendable (Duration, Result<CriuDump.LazyRepair?, any Error>) -> Void

    /// `dumpedEvent` is told how long the dump took, once it holds the
    /// process, and what `CriuDump.leaveLazy` put back in the lazy set (or
    /// why it could not).
    public init(process: TrackedProcess, criu: Criu, workDirectory: String, grace: Duration,
                dumpedEvent: @escaping @Sendable (Duration, Result<CriuDump.LazyRepair?, any Error>) -> Void = { _, _ in }) throws {
        self.process = process
        dump = try CriuDump(criu: criu, pid: process.pid, workDirectory: workDirectory, grace: grace)
        report = dumpedEvent
    }

    public var pid: Int32 { process.pid }
    public var trackerName: String { process.trackerName }
    public var regions: [Region] { process.regions }
    public var unprotectable: [Region] { process.unprotectable }
    public func startTracking() throws { try process.startTracking() }
    public func scanWrittenSinceRead() throws -> [AddressRange] { try process.scanWrittenSinceRead() }
    public func readPages(_ ranges: [AddressRange], into buffer: UnsafeMutableRawBufferPointer) throws -> [AddressRange] {
        try process.readPages(ranges, into: buffer)
    }
    public func refreshLayout() throws -> LayoutChange { try process.refreshLayout() }

    /// CRIU dumps the process and holds it frozen in the post-dump hook.
    public func freeze() throws -> Duration {
        if dumped.withLock({ $0 }) { return .zero }
        let took: Duration
        do {
            took = try dump.dumpUntilFrozen()
        } catch {
            throw CriuStepFailed("\(error); pid \(pid) was not dumped and runs on")
        }
        dumped.withLock { $0 = true }
        // CRIU may have written memory it should have left lazy (a
        // page-aligned stack pointer: CriuDump.leaveLazy): Ferry moves that
        // memory, so the images need not carry it. Should the repair fail,
        // the images stay as CRIU wrote them (still a valid dump, perhaps
        // too large to send) and the seeder says why.
        var servable = process.regions.map { (start: $0.range.start, end: $0.range.end) }
        servable += process.unprotectable.map { (start: $0.range.start, end: $0.range.end) }
        let repair = Result { try dump.leaveLazy(servable: servable) }
        report(took, repair)
        return took
    }

    /// Finalize failed after the dump: CRIU resumes the process.
    public func thaw() throws {
        if dumped.withLock({ $0 }), let error = dump.end(resume: true) { throw error }
    }

    public func release(then: ThenAction) throws {
        var failure: (any Error)? = nil
        if dumped.withLock({ $0 }) { failure = dump.end(resume: then == .resume) }
        if then == .resume {
            try process.release(then: .resume)
        } else {
            try? process.detach() // CRIU killed it
        }
        if let failure { throw failure }
    }

    public func handles(_ method: UInt16) -> Bool { method == CriuMethod.images }

    public func handle(_ method: UInt16, _ payload: [UInt8]) async throws -> [[UInt8]] {
        guard dumped.withLock({ $0 }) else {
            throw RPCError(code: .badRequest, message: "CRIU's images exist only after Finalize")
        }
        let bytes = try dump.packedImages()
        var parts: [[UInt8]] = []
        var offset = 0
        repeat {
            let end = min(bytes.count, offset + CriuMethod.partBytes)
            parts.append(Array(bytes[offset..<end]))
            offset = end
        } while offset < bytes.count
        return parts
    }
}

/// A CRIU step failed, and what became of the process.
struct CriuStepFailed: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}

extension SessionLink {
    /// One call of an extension method, streamed. Not retried on a resumed
    /// connection: a lost reply fails the migration (the source resumes).
    nonisolated func callExtra(_ method: UInt16, _ payload: [UInt8], limit: Int) async throws -> [UInt8] {
        let (client, _) = try await current()
        var bytes: [UInt8] = []
        do {
            for try await part in client.callStreaming(method, payload) {
                bytes += part
                guard bytes.count <= limit else {
                    throw MigrationError.protocolViolation("the seeder sent more than \(limit >> 20) MiB of CRIU images")
                }
            }
        } catch let rpc as RPCError where !isLinkFailure(rpc) {
            throw MigrationError.seeder("the seeder refused CRIU's images: \(rpc.message)")
        }
        return bytes
    }
}
