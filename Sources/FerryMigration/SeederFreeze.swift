// The seeder's blocking work on the session: the dirty scan that answers
// Sync, the freeze that answers Finalize, and the hashes that answer
// Checksum. Each runs on a thread of its own (SeederRequests.swift), holding
// `reading` alone while it scans, so no ReadAt falls between a re-arm and
// its mark-sent.
import Foundation
import FerryToolkit

extension SeederService {
    /// Scans, folds the result into the session, and re-reads the layout;
    /// a changed layout starts a new epoch. The caller holds `reading` alone
    /// and `state`.
    private func rescan(_ s: inout State) throws {
        // The rate that matters to the leecher: how fast its copies go stale.
        // (Pages never sent, or already stale, are reported again and again
        // by scans that do not re-arm; they change nothing.)
        let stale = s.store.markDirty(try source.scanWrittenSinceRead())
        s.dirtyRate.add(UInt64(stale))
        metrics.foundDirty(pages: stale)
        metrics.dirtyRate(s.dirtyRate.perSecond)
        let change = try source.refreshLayout()
        guard !change.isEmpty else { return }
        s.layout = change.regions
        s.layoutEpoch += 1
        s.store.reconcile(layout: s.layout)
        // An address whose backing changed was covered before and is still
        // covered: it is dirty, whatever was sent from it.
        s.store.markDirty(change.newlyDirty)
        // What the refresh registered anew is reported by the next scan;
        // take it now, so a Finalize misses nothing.
        s.store.markDirty(try source.scanWrittenSinceRead())
    }

    /// Sync, on a thread that may block: a scan while tracking.
    func sync(knownEpoch: UInt64) throws -> SyncReply {
        try reading.exclusive { try state.withLock { s in
            guard s.phase == .tracking || s.phase == .frozen else {
                throw RPCError(code: .badRequest, message: "Sync needs a tracking session")
            }
            if s.phase == .tracking { try rescan(&s) }
            return SyncReply(layoutEpoch: s.layoutEpoch, layout: knownEpoch == s.layoutEpoch ? nil : s.layout,
                             dirty: s.store.ranges(in: [.dirty], maxPages: Int(UInt32.max)),
                             dirtyPagesPerSecond: UInt64(s.dirtyRate.perSecond))
        } }
    }

    /// Finalize, on a thread that may block: freezes the process (ptrace
    /// stops every thread) and takes the final scan; answered again alike.
    func finalize() throws -> FinalizeReply {
        let reply = try reading.exclusive { try state.withLock { s -> FinalizeReply in
            if let done = s.finalized { return done }
            guard s.phase == .tracking else {
                throw RPCError(code: .badRequest, message: "Finalize needs a tracking session, this one is \(s.phase.map { "\($0)" } ?? "not started")")
            }
            let frozeAt = ContinuousClock.now
            let frozenFor = try source.freeze()
            do {
                try rescan(&s)
            } catch {
                try? source.thaw()
                throw error
            }
            var dirty = s.store.ranges(in: [.dirty], maxPages: Int(UInt32.max))
            dirty += source.unprotectable.map(\.range)
            let micros = UInt64(clamping: frozenFor.wholeMicroseconds)
            let reply = FinalizeReply(layoutEpoch: s.layoutEpoch, layout: s.layout, dirty: dirty,
                                      freezeMicroseconds: micros)
            s.finalized = reply
            s.frozenAtMilliseconds = UInt64(Date().timeIntervalSince1970 * 1000)
            s.phase = .frozen
            metrics.entered(.frozen)
            metrics.finalized(downtime: .now - frozeAt, freezeMicroseconds: micros)
            return reply
        } }
        let pages = reply.dirty.reduce(0) { $0 + $1.pageCount }
        events(.finalized(freezeMilliseconds: Double(reply.freezeMicroseconds) / 1000, dirtyPages: pages))
        return reply
    }

    /// Checksum, on a thread that may block: reads and hashes whole ranges
    /// of the frozen process.
    func checksum(_ ranges: [AddressRange]) throws -> ChecksumReply {
        let (phase, migrated) = state.withLock { ($0.phase, $0.migrated) }
        guard phase == .frozen else {
            throw RPCError(code: .badRequest, message: "Checksum is only answered once the process is frozen")
        }
        for range in ranges where Ranges.subtract([range], migrated) != [] {
            throw RPCError(code: .badRequest,
                           message: "range \(range) is not migrated memory of pid \(source.pid): Checksum covers only the final layout's migrated regions")
        }
        var digests: [[UInt8]] = []
        let chunk = 1024 * Int(pageSize)
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: chunk, alignment: Int(pageSize))
        defer { buffer.deallocate() }
        for range in ranges {
            var hasher = Blake2b256()
            var start = range.start
            while start < range.end {
                let end = min(range.end, start + UInt64(chunk))
                let view = UnsafeMutableRawBufferPointer(rebasing: buffer[..<Int(end - start)])
                let vanished = try source.readPages([AddressRange(start: start, end: end)], into: view)
                // Holes (mapped, unbacked) count as zeros, as the image holds them;
                // the reader zero-filled them.
                guard Ranges.subtract(Ranges.merge(vanished), try unbacked(vanished)).isEmpty else {
                    throw RPCError(code: .badRequest, message: "range \(range) is not mapped in pid \(source.pid)")
                }
                hasher.update(UnsafeRawBufferPointer(view))
                start = end
            }
            digests.append(hasher.finish())
        }
        var reply = ChecksumReply(digests: digests)
        if let key = options.signingKey {
            let (session, frozenAt, layout) = state.withLock { ($0.session, $0.frozenAtMilliseconds, $0.finalized?.layout ?? $0.layout) }
            try reply.sign(with: key, pid: source.pid, host: options.host, session: session,
                           frozenAtMilliseconds: frozenAt, layout: layout, ranges: ranges)
        }
        return reply
    }
}
