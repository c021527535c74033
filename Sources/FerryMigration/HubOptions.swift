// What a hub is told (options, test doubles) and what it tells (events).
import Foundation

public enum HubFinalizePolicy: String, Sendable, CaseIterable {
    /// Freeze once every attached leecher has asked to finalize.
    case whenAllReady = "when-all-ready"
    /// Freeze when the first leecher asks.
    case first
    /// Freeze when the operator says so (`HubService.finalizeNow()`, SIGUSR1 on `hub serve`).
    case manual
}

public struct HubOptions: Sendable {
    public var finalize: HubFinalizePolicy = .whenAllReady
    /// Cached page bytes kept in memory; more spills to a file in `spillDirectory`.
    public var memoryLimit = 1 << 30
    public var spillDirectory = NSTemporaryDirectory()
    /// How long a leecher's session outlives its connection.
    public var grace: Duration = .seconds(5)
    /// Upstream dirty reports are at most this old when a leecher asks for
    /// one. The leecher's own default interval: asking upstream more often
    /// than leechers ask the hub only re-fetches hot pages more often
    /// (measured: 100 ms read 1.18x the pages of one leecher with 16, 200 ms 1.12x).
    public var syncInterval: Duration = .milliseconds(200)
    public var host = ProcessInfo.processInfo.hostName
    /// The bandwidth cap on what the hub sends its leechers (`--max-bandwidth`):
    /// bulk ReadAt parts wait on it, a companion connection's (post-copy
    /// touches) only charge it. Nil: no cap.
    public var pacer: Pacer? = nil

    public init() {}
}

/// Test doubles a hub is built with (`HubService(options:testHooks:events:)`):
/// tests set them to play a hub that lies, and show what leechers catch.
/// `hub serve` sets none.
struct HubTestHooks: Sendable {
    /// Reads one page as the hub would serve it into a page-sized buffer;
    /// false when the hub holds no data for it (it serves zeros).
    typealias PageReader = (_ page: UInt64, _ into: UnsafeMutableRawPointer) throws -> Bool

    /// Sees each ReadAt part before it is built: `chunk[i]` is at offset
    /// `i * pageSize` of `buffer`, and `cached` lists the pages of the chunk
    /// served from the cache (the others are answered unmapped).
    var beforeSendingPart: (@Sendable (_ chunk: [UInt64], _ cached: [UInt64], _ buffer: UnsafeMutableRawBufferPointer) -> Void)?
    /// Answers Checksum in the hub's place instead of forwarding the
    /// seeder's answer.
    var answerChecksum: (@Sendable (_ ranges: [AddressRange], _ read: PageReader) throws -> ChecksumReply)?

    init(beforeSendingPart: (@Sendable ([UInt64], [UInt64], UnsafeMutableRawBufferPointer) -> Void)? = nil,
         answerChecksum: (@Sendable ([AddressRange], PageReader) throws -> ChecksumReply)? = nil) {
        self.beforeSendingPart = beforeSendingPart
        self.answerChecksum = answerChecksum
    }
}

public enum HubEvent: Sendable {
    case upstream(migration: String, pid: Int32, host: String)
    case leecherJoined(peer: String, migration: String)
    case leecherLeft(peer: String, reason: String)
    case waitingToFinalize(ready: Int, attached: Int)
    case finalized(migration: String, freezeMilliseconds: Double, dirtyPages: UInt64)
    case upstreamLost(migration: String, reason: String)
    case completed(migration: String, message: String)
    /// Every leecher left after the freeze and none completed: the hub told
    /// the seeder to abort, which thaws the source.
    case abandoned(migration: String, message: String)
}
