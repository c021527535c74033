// The end of an upstream session: the one Finalize, the fill of the cache
// after it, the checksums of the frozen source, and the Complete or Abort
// that lets the source go.
import Foundation
import Synchronization

extension HubUpstream {
    /// Starts the upstream Finalize, once; `finalized()` waits for its reply.
    func startFinalize() {
        let first = state.withLock { s -> Bool in
            guard !s.finalizeStarted else { return false }
            s.finalizeStarted = true
            return true
        }
        guard first else { return }
        finalizing.start(0) { [self] in
            do {
                // A Sync in flight was answered before the freeze: its
                // report (a layout, at least) comes first.
                _ = try? await syncing.join(0)
                let asked = ContinuousClock.now
                let report = try DirtyReportCodec.decode(try await link.callParts(.finalize, []))
                apply(epoch: report.epoch, layout: report.layout, dirty: report.dirty)
                let reply = FinalizeReply(layoutEpoch: report.epoch, layout: report.layout ?? [],
                                          dirty: report.dirty, freezeMicroseconds: report.freeze)
                state.withLock { s in
                    s.finalized = reply
                    s.phase = .frozen
                }
                metrics.entered(.frozen)
                metrics.finalized(downtime: .now - asked, freezeMicroseconds: report.freeze)
                events(.finalized(migration: name, freezeMilliseconds: Double(report.freeze) / 1000,
                                  dirtyPages: report.dirty.reduce(0) { $0 + $1.pageCount }))
                startFill()
                return reply
            } catch {
                throw failed(error)
            }
        }
        settled.set(())
    }

    /// The upstream Finalize reply, once the policy has started it. Until
    /// then, keeps an eye on the source at the sync interval: a lost
    /// upstream must fail the leecher waiting here, not leave it waiting
    /// forever.
    func finalized() async throws -> FinalizeReply {
        while true {
            if state.withLock({ $0.finalizeStarted }), let reply = try await finalizing.join(0) { return reply }
            let (reply, failure, started) = state.withLock { ($0.finalized, $0.failure, $0.finalizeStarted) }
            if let reply { return reply }
            if let failure { throw RPCError(code: .unavailable, message: failure) }
            if started {
                // Between the start and its flight's registration: a moment.
                await Task.yield()
                continue
            }
            try await sync()
            // A genuine timer: the next look at the source, unless Finalize
            // starts (or the upstream is lost) first.
            _ = await settled.wait(limit: options.syncInterval)
            try Task.checkCancellation()
        }
    }

    /// After the freeze, pulls every page not yet cached, so the hub can
    /// serve late leechers and outlive its upstream; then the checksums of
    /// the whole frozen image.
    private func startFill() {
        let task = Task { [self] in
            let layout = state.withLock { $0.layout }
            for region in layout where region.kind == .migrate {
                var start = region.start
                while start < region.end {
                    let end = min(region.end, start + UInt64(MigrationLimits.maxPagesPerRead) * pageSize)
                    do {
                        try await ensureCached(Array(stride(from: start, to: end, by: Int(pageSize))))
                    } catch {
                        return
                    }
                    start = end
                }
            }
            _ = try? await checksum(layout.filter { $0.kind == .migrate }.map(\.range))
        }
        fill.set(task)
    }

    /// Waits until the source is frozen and its whole frozen image cached
    /// (or `limit` passes before the fill starts); true when it is.
    func waitUntilFilled(limit: Duration) async -> Bool {
        guard let filling = await fill.wait(limit: limit) else { return false }
        await filling.value
        return true
    }

    /// The seeder's Checksum reply for `ranges`, as it sent it: asked once
    /// per set of ranges, however many leechers ask.
    func checksum(_ ranges: [AddressRange]) async throws -> [UInt8] {
        if let known = state.withLock({ $0.checksums[ranges] }) { return known }
        do {
            return try await checksumming.run(ranges) { [self] in
                var request = WireWriter()
                request.ranges(ranges)
                let reply = try await link.call(.checksum, request.bytes)
                // Kept only when answered: after a failure a later asker
                // tries again (through a resumed upstream).
                state.withLock { $0.checksums[ranges] = reply }
                return reply
            }
        } catch let error where Self.cancelled(error) {
            throw error
        } catch {
            throw failed(error)
        }
    }

    /// Completes the source, once the fill has cached the whole image.
    func complete() async {
        await fill.value?.value
        do {
            let said = try OutcomeReply.decode(try await link.call(.complete, [])).message
            let first = state.withLock { s -> Bool in
                defer { s.completed = said }
                return s.completed == nil
            }
            if first {
                metrics.entered(.completed)
                events(.completed(migration: name, message: said))
            }
            await link.close()
        } catch {
            _ = failed(error)
        }
    }

    /// Tells the seeder to abort, which thaws the source: nobody holds the image.
    func abort() async {
        let said = (try? OutcomeReply.decode(try await link.call(.abort, [])).message)
            ?? "the seeder did not answer; it thaws the source itself after its grace period"
        state.withLock { $0.aborted = said }
        metrics.entered(.aborted)
        metrics.error(.aborted)
        events(.abandoned(migration: name, message: said))
        await link.close()
    }
}
