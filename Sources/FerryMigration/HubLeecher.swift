// One leecher's session on a hub: the version of each page it was sent, so
// its dirty set is the pages it holds at an older version than the current
// one; and its ReadAt, served from the cache.
import Foundation
import Synchronization

final class HubLeecher: Sendable {
    let session: [UInt8]
    private let upstream: HubUpstream
    private let hooks: HubTestHooks
    /// The version of each page as last sent to this leecher. Locking: taken
    /// holding no other lock, and no other lock is taken while it is held.
    private let sent = Mutex(PageVersionMap())
    /// What this leecher's ReadAt requests may hold at once.
    private let readBudget = ByteBudget(bytes: MigrationLimits.readBudgetPerConnection)

    init(session: [UInt8], upstream: HubUpstream, hooks: HubTestHooks) {
        self.session = session
        self.upstream = upstream
        self.hooks = hooks
    }

    /// Serves one ReadAt, within this leecher's read budget. `urgent`: a
    /// companion connection's (post-copy touches), which only charges the
    /// bandwidth cap instead of waiting on it.
    func readAt(_ request: ReadRequest, _ parts: RPCPartWriter, urgent: Bool) async throws {
        try await readBudget.withBytes(MigrationLimits.readAtHolds) {
            try await serve(request, parts, urgent: urgent)
        }
    }

    private func serve(_ request: ReadRequest, _ parts: RPCPartWriter, urgent: Bool) async throws {
        let covered = upstream.migratable
        var pages: [UInt64] = []
        for range in request.ranges {
            pages.append(contentsOf: stride(from: range.start, to: range.end, by: Int(pageSize)))
        }
        let mapped = pages.filter { Ranges.contains(covered, $0) }
        let missed = try await upstream.ensureCached(mapped)
        upstream.metrics.servedFromCache(pages: mapped.count - missed)
        // Pages outside the layout are answered unmapped: a copy cached
        // there is of memory that is gone (the leecher learns the layout
        // from its next Sync).
        let inLayout = Set(mapped)
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: MigrationLimits.pagesPerPart * Int(pageSize),
                                                           alignment: Int(pageSize))
        defer { buffer.deallocate() }
        var index = 0
        while index < pages.count {
            let chunk = Array(pages[index..<min(pages.count, index + MigrationLimits.pagesPerPart)])
            index += chunk.count
            let copied = try upstream.cache.copy(chunk, inLayout: inLayout, into: buffer)
            hooks.beforeSendingPart?(chunk, copied.served.map(\.page), buffer)
            let resent = sent.withLock { sent -> Int in
                var again = 0
                for (page, version) in copied.served {
                    if sent[page] != nil { again += 1 }
                    sent[page] = version
                }
                return again
            }
            let bytes = UnsafeRawBufferPointer(rebasing: buffer[..<(chunk.count * Int(pageSize))])
            let part = PagePart.build(ranges: copied.ranges, data: bytes, unmapped: copied.unmapped, holes: copied.holes)
            upstream.metrics.sent(pages: copied.served.count, bytes: part.count, resent: resent)
            // The cap: bulk waits, a touch only charges (no lock is held here).
            if let pacer = upstream.options.pacer {
                if urgent { pacer.charge(part.count) } else { try await pacer.pace(part.count) }
            }
            try await parts.send(part)
        }
    }

    /// This leecher's dirty set: pages it holds at an older version than the
    /// current one; with the layout unless the leecher knows its epoch
    /// (`knownEpoch`, nil: always).
    func report(knownEpoch: UInt64? = nil) -> SyncReply {
        let (versions, layout, epoch) = upstream.versions
        let includeLayout = knownEpoch != epoch
        // Only pages written since the hub started have a version other than
        // 0 (versions are never dropped), so they are all that can differ.
        var dirtyPages = sent.withLock { sent in
            versions.compactMap { page, version in sent[page].map { $0 != version } == true ? page : nil }
        }
        dirtyPages.sort()
        var dirty: [AddressRange] = []
        for page in dirtyPages { Ranges.append(AddressRange(start: page, end: page + pageSize), to: &dirty) }
        return SyncReply(layoutEpoch: epoch, layout: includeLayout ? layout : nil, dirty: dirty, dirtyPagesPerSecond: 0)
    }
}
