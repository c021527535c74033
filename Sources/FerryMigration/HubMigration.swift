// One relayed migration: its upstream session (HubUpstream) and the
// leechers pulling it. This type keeps the roster (who is attached, ready,
// completed), applies the finalize policy, and decides between Complete and
// Abort upstream once the source is frozen. The source freezes once for all
// leechers, when the policy says so.
//
// Locking: `roster` is taken holding no other lock, and no other lock is
// taken while it is held; what it needs of the upstream is read before
// (`HubUpstream.view`).
import Foundation
import FerryToolkit
import Synchronization

final class HubMigration: Sendable {
    let name: String
    let upstream: HubUpstream
    private let options: HubOptions
    private let events: @Sendable (HubEvent) -> Void
    private let metrics: MigrationMetrics
    private let hooks: HubTestHooks

    private struct Member {
        let leecher: HubLeecher
        var ready = false
        var completed = false
        var attached = true
        /// Counts the connections that took the session, so a grace timer
        /// knows whether the one it watches is still the last.
        var owner = 0
    }
    private struct Roster {
        var members: [Member] = []
        var operatorSaidFinalize = false
        /// Set when every leecher left after the freeze and the hub told the
        /// seeder to abort (the source thaws): nothing more to serve.
        var abandoned: String? = nil
        /// Upstream Complete was started: leechers completing at the same
        /// time must not send it twice (the second would be refused).
        var completing = false

        func index(of leecher: HubLeecher) -> Int? { members.firstIndex { $0.leecher === leecher } }
    }
    private let roster = Mutex(Roster())

    init(name: String, link: SessionLink, options: HubOptions, hooks: HubTestHooks,
         events: @escaping @Sendable (HubEvent) -> Void, metrics: MigrationMetrics) {
        self.name = name
        self.options = options
        self.events = events
        self.metrics = metrics
        self.hooks = hooks
        metrics.entered(.tracking)
        upstream = HubUpstream(name: name, link: link, options: options, events: events, metrics: metrics)
    }

    /// The pages of `ranges` that get a new version (`HubUpstream.renewed`;
    /// UntrustedPeerTests calls it by this name).
    static func renewed(_ ranges: [AddressRange], layout: [Region]) -> [AddressRange] {
        HubUpstream.renewed(ranges, layout: layout)
    }

    /// For `--metrics`: the phase as leechers would see it, and how many
    /// leechers are attached.
    var metricState: (SessionPhase, Int) {
        let view = upstream.view
        return roster.withLock { r in
            let phase: SessionPhase = r.abandoned != nil ? .aborted
                : view.completed != nil ? .completed
                : view.frozen ? .frozen : .tracking
            return (phase, r.members.filter(\.attached).count)
        }
    }

    /// True when `leecher` left without completing or aborting, while the
    /// migration was not over (completed or abandoned): an error to count.
    func leftUnfinished(_ leecher: HubLeecher) -> Bool {
        let completed = upstream.view.completed != nil
        return roster.withLock { r in
            guard r.abandoned == nil, !completed, let i = r.index(of: leecher) else { return false }
            return !r.members[i].completed && r.members[i].attached
        }
    }

    // MARK: Leechers

    /// Opens a leecher's session, or resumes one (MigrationDispatcher has
    /// checked the protocol version).
    func track(_ request: TrackRequest) async throws -> (HubLeecher, TrackReply) {
        let info = try await upstream.info()
        let view = upstream.view
        return try roster.withLock { r in
            if let abandoned = r.abandoned {
                throw RPCError(code: .unavailable, message: abandoned)
            }
            // Before the freeze the hub holds only part of the image: without
            // its upstream, a new leecher could never finish.
            if let failure = view.failure, !view.frozen, request.resume == nil {
                throw RPCError(code: .unavailable, message: failure)
            }
            let index: Int
            if let resume = request.resume {
                guard let known = r.members.firstIndex(where: { $0.leecher.session == resume }) else {
                    throw RPCError(code: .badRequest, message: "no session to resume on this hub for migration '\(name)'")
                }
                index = known
                if !request.companion { metrics.resumed() }
            } else {
                let session = (0..<16).map { _ in UInt8.random(in: 0...255) }
                r.members.append(Member(leecher: HubLeecher(session: session, upstream: upstream, hooks: hooks)))
                index = r.members.count - 1
            }
            // A companion connection (priority reads) joins without taking the session.
            if !request.companion {
                r.members[index].attached = true
                r.members[index].owner += 1
            }
            let leecher = r.members[index].leecher
            let phase: SessionPhase = r.members[index].completed ? .completed : (view.frozen ? .frozen : .tracking)
            return (leecher, TrackReply(session: leecher.session, phase: phase, pid: info.pid, host: info.host,
                                        tracker: info.tracker, graceMilliseconds: options.grace.milliseconds(clampedTo: 0...UInt32.max),
                                        layoutEpoch: view.layoutEpoch, layout: view.layout))
        }
    }

    func leecherDisconnected(_ leecher: HubLeecher) {
        let owner = roster.withLock { r -> Int? in
            guard let i = r.index(of: leecher) else { return nil }
            r.members[i].attached = false
            return r.members[i].owner
        }
        guard let owner else { return }
        let grace = options.grace
        Task {
            // A genuine timer: the session outlives its connection this long.
            try? await Task.sleep(for: grace)
            // A completed leecher stays on the roster: it counts as done when
            // the hub decides between Complete and Abort upstream.
            let gone = roster.withLock { r in
                r.index(of: leecher).map { !r.members[$0].attached && r.members[$0].owner == owner && !r.members[$0].completed } ?? false
            }
            if gone { await self.leecherGone(leecher) }
        }
    }

    /// A leecher gone for good (aborted, or away past the grace period) no
    /// longer holds up a finalize or a complete; if it was the last one after
    /// the freeze, the source is let go.
    private func leecherGone(_ leecher: HubLeecher) async {
        roster.withLock { r in r.members.removeAll { $0.leecher === leecher } }
        maybeFinalize()
        await maybeCompleteUpstream()
    }

    // MARK: Requests (HubService routes them here)

    func sync(knownEpoch: UInt64, for leecher: HubLeecher) async throws -> SyncReply {
        try await upstream.sync()
        return leecher.report(knownEpoch: knownEpoch)
    }

    func finalize(for leecher: HubLeecher) async throws -> FinalizeReply {
        roster.withLock { r in r.index(of: leecher).map { r.members[$0].ready = true } }
        maybeFinalize()
        let final = try await upstream.finalized()
        let reply = leecher.report()
        return FinalizeReply(layoutEpoch: reply.layoutEpoch, layout: reply.layout ?? [], dirty: reply.dirty,
                             freezeMicroseconds: final.freezeMicroseconds)
    }

    func checksum(_ ranges: [AddressRange]) async throws -> ChecksumReply {
        if let answer = hooks.answerChecksum { return try answer(ranges, upstream.cache.load) }
        // The seeder's reply as it is (signed by a seeder with a key pair).
        return try ChecksumReply.decode(try await upstream.checksum(ranges))
    }

    func complete(for leecher: HubLeecher) async throws -> OutcomeReply {
        guard upstream.view.frozen else {
            throw RPCError(code: .badRequest, message: "Complete needs a finalized migration; call Finalize first")
        }
        roster.withLock { r in r.index(of: leecher).map { r.members[$0].completed = true } }
        await maybeCompleteUpstream()
        let view = upstream.view
        if let done = view.completed { return OutcomeReply(message: done) }
        if let failure = view.failure {
            return OutcomeReply(message: "image served from the hub's cache; the source was not told (\(failure))")
        }
        return OutcomeReply(message: "the hub will complete the source once every leecher has")
    }

    func abort(for leecher: HubLeecher) async -> OutcomeReply {
        roster.withLock { r in r.index(of: leecher).map { r.members[$0].attached = false } }
        await leecherGone(leecher)
        return OutcomeReply(message: leftMessage())
    }

    /// The answer to a leecher's Abort: what becomes of the source.
    private func leftMessage() -> String {
        let view = upstream.view
        let others = roster.withLock { $0.members.count }
        if let said = view.aborted {
            return "left migration '\(name)' as the last leecher after the freeze, so the hub told the seeder to abort; the seeder said: \(said)"
        }
        if let done = view.completed {
            return "left migration '\(name)', which the other leechers completed: \(done)"
        }
        if let failure = view.failure {
            return "left migration '\(name)'; \(failure) (a seeder left alone thaws the source after its grace period)"
        }
        if view.frozen {
            return "left migration '\(name)'; the source stays frozen for the \(others) other leecher(s)"
        }
        return others > 0
            ? "left migration '\(name)' before the freeze; the source runs on, tracked for the \(others) other leecher(s)"
            : "left migration '\(name)' before the freeze; the source runs on (the hub keeps tracking it for leechers to come)"
    }

    // MARK: Finalize and complete

    func operatorFinalize() {
        roster.withLock { $0.operatorSaidFinalize = true }
        maybeFinalize()
    }

    /// Starts the upstream Finalize when the policy is met.
    private func maybeFinalize() {
        let view = upstream.view
        guard view.started, !view.finalizeStarted else { return }
        let (go, ready, attached) = roster.withLock { r -> (Bool, Int, Int) in
            let ready = r.members.filter(\.ready).count
            let attached = r.members.count
            switch options.finalize {
            case .first: return (ready > 0, ready, attached)
            case .whenAllReady: return (ready > 0 && ready == attached, ready, attached)
            case .manual: return (r.operatorSaidFinalize, ready, attached)
            }
        }
        if go {
            upstream.startFinalize()
        } else if options.finalize != .first && ready > 0 {
            events(.waitingToFinalize(ready: ready, attached: attached))
        }
    }

    /// After the freeze: completes upstream once every leecher on the roster
    /// has completed and the cache holds the whole frozen image; aborts it
    /// (the source thaws) when no leecher is left and none completed, since
    /// nobody holds the image then.
    private func maybeCompleteUpstream() async {
        let view = upstream.view
        guard view.frozen, view.completed == nil, view.failure == nil else { return }
        enum End { case complete, abort }
        let end = roster.withLock { r -> End? in
            guard r.abandoned == nil else { return nil }
            if r.members.isEmpty {
                r.abandoned = "migration '\(name)' was abandoned: every leecher left after the freeze, so the hub told the seeder to abort (the source thaws and runs on); start a new migration"
                return .abort
            }
            let allDone = !r.completing && r.members.allSatisfy(\.completed)
            if allDone { r.completing = true }
            return allDone ? .complete : nil
        }
        switch end {
        case nil: return
        case .abort: await upstream.abort()
        case .complete: await upstream.complete()
        }
    }
}
