// The hub's end of one upstream session, and the one owner of what the hub
// knows of the source: its layout, each page's version, the cached pages
// (HubCache), the Finalize reply, the fill after it and the checksums.
// Every call made upstream goes through here, and concurrent askers share
// one call (SingleFlight): the open, each Sync, each page fetch, Finalize
// and each Checksum.
//
// Page versions: a page's version goes up each time upstream reports it
// written; each leecher remembers the version it was sent (HubLeecher), so
// an early and a late leecher each learn exactly what they lack.
//
// Locking: `state` is the only lock of this type. No other lock is taken
// while it is held, and it is not taken while another is held (the cache
// and the leechers' locks are separate and never nested with it).
//
// The Finalize, the fill, Checksum, Complete and Abort are in
// HubUpstream+Finalize.swift; `state`, `apply` and the flights are internal
// only for that extension: no other type touches them.
import Foundation
import Synchronization

final class HubUpstream: Sendable {
    let name: String
    let options: HubOptions
    let link: SessionLink
    let metrics: MigrationMetrics
    let cache: HubCache
    let events: @Sendable (HubEvent) -> Void

    struct State {
        /// The first Track reply upstream gave.
        var info: TrackReply? = nil
        var phase: SessionPhase = .tracking
        var layout: [Region] = []
        var layoutEpoch: UInt64 = 0
        var versions: [UInt64: UInt32] = [:]
        /// Pages upstream said are not mapped in the frozen source, at the
        /// version asked: nothing to fetch. (Before the freeze such an answer
        /// is only true for a moment: a heap trimmed and grown back between
        /// two scans looks unchanged to the next layout, so the page is asked
        /// again each time.)
        var unmappedAt: [UInt64: UInt32] = [:]
        var lastSync: ContinuousClock.Instant? = nil
        /// Set once the upstream Finalize is started: no Sync is sent after it.
        var finalizeStarted = false
        var finalized: FinalizeReply? = nil
        var failure: String? = nil
        /// The seeder's answer to Complete.
        var completed: String? = nil
        /// The seeder's answer to the hub's Abort of an abandoned migration.
        var aborted: String? = nil
        /// Checksum replies by the ranges asked: the upstream is asked once
        /// per set of ranges (it may be gone by the time a second would be made).
        var checksums: [[AddressRange]: [UInt8]] = [:]
    }
    let state = Mutex(State())
    /// One flight each; the Int keys are 0, there being one of each call at a time.
    private let opening = SingleFlight<Int, TrackReply>()
    let syncing = SingleFlight<Int, Void>()
    private let fetching = SingleFlight<UInt64, Void>()
    let finalizing = SingleFlight<Int, FinalizeReply>()
    let checksumming = SingleFlight<[AddressRange], [UInt8]>()
    /// Set when the upstream Finalize starts or the upstream is lost: what a
    /// leecher waiting to finalize waits for.
    let settled = Latch<Void>()
    /// The fill of the cache after the freeze, once started.
    let fill = Latch<Task<Void, Never>>()

    init(name: String, link: SessionLink, options: HubOptions, events: @escaping @Sendable (HubEvent) -> Void,
         metrics: MigrationMetrics) {
        self.name = name
        self.options = options
        self.events = events
        self.link = link
        self.metrics = metrics
        cache = HubCache(options: options)
    }

    /// What the leechers' side reads of the upstream state at one moment.
    struct View {
        var started: Bool
        var finalizeStarted: Bool
        var layout: [Region]
        var layoutEpoch: UInt64
        var frozen: Bool
        var failure: String?
        var completed: String?
        var aborted: String?
    }

    var view: View {
        state.withLock { s in
            View(started: s.info != nil, finalizeStarted: s.finalizeStarted, layout: s.layout, layoutEpoch: s.layoutEpoch, frozen: s.finalized != nil,
                 failure: s.failure, completed: s.completed, aborted: s.aborted)
        }
    }

    var phase: SessionPhase { state.withLock { $0.phase } }

    /// Each page's current version, with the layout and its epoch.
    var versions: (versions: [UInt64: UInt32], layout: [Region], epoch: UInt64) {
        state.withLock { ($0.versions, $0.layout, $0.layoutEpoch) }
    }

    /// The ranges the layout migrates, merged.
    var migratable: [AddressRange] {
        Ranges.merge(state.withLock { $0.layout }.filter { $0.kind == .migrate }.map(\.range))
    }

    // MARK: Open, failure

    /// Starts the upstream session once, for all leechers.
    func info() async throws -> TrackReply {
        if let info = state.withLock({ $0.info }) { return info }
        do {
            return try await opening.run(0) { [self] in
                let reply = try await link.open()
                state.withLock { s in
                    if s.info == nil {
                        s.info = reply
                        s.layout = reply.layout
                        s.layoutEpoch = reply.layoutEpoch
                        s.phase = reply.phase
                    }
                }
                return reply
            }
        } catch let error where Self.cancelled(error) {
            throw error
        } catch {
            throw RPCError(code: .unavailable, message: "the hub cannot reach the seeder of migration '\(name)': \(error)")
        }
    }

    /// Records the upstream as lost (reported once) and returns the error
    /// leechers are told.
    func failed(_ error: any Error) -> RPCError {
        let message = "the hub lost the seeder of migration '\(name)': \(error)"
        let first = state.withLock { s -> Bool in
            defer { if s.failure == nil { s.failure = message } }
            return s.failure == nil
        }
        if first {
            metrics.error(.upstreamLost)
            events(.upstreamLost(migration: name, reason: "\(error)"))
            settled.set(())
        }
        return RPCError(code: .unavailable, message: message)
    }

    /// A waiter whose request was cancelled (its connection closed) stopped
    /// waiting: that says nothing of the upstream.
    static func cancelled(_ error: any Error) -> Bool {
        error is CancellationError && Task.isCancelled
    }

    /// `error` as leechers are told it: an RPC error as it is, anything
    /// else as the upstream lost.
    private func passed(_ error: any Error) -> any Error {
        if error is RPCError || Self.cancelled(error) { return error }
        return failed(error)
    }

    // MARK: Sync

    /// A fresh upstream dirty report, at most `syncInterval` old, shared by
    /// all leechers asking at the same time.
    func sync() async throws {
        let due = state.withLock { s -> Bool in
            // Once Finalize is under way, its reply says everything a Sync
            // would (and it waits for the Sync already in flight).
            guard s.phase == .tracking, s.failure == nil, !s.finalizeStarted else { return false }
            if let last = s.lastSync, ContinuousClock.now - last < options.syncInterval { return false }
            return true
        }
        guard due else { return }
        do {
            try await syncing.run(0) { [self] in
                defer { state.withLock { $0.lastSync = .now } }
                // Finalize started since the check above: it waits for a Sync
                // in flight, and this one is too late to send.
                guard let epoch = state.withLock({ $0.finalizeStarted ? nil : $0.layoutEpoch }) else { return }
                var w = WireWriter()
                w.u64(epoch)
                let report = try DirtyReportCodec.decode(try await link.callParts(.sync, w.bytes))
                metrics.dirtyRate(Double(report.rate))
                apply(epoch: report.epoch, layout: report.layout, dirty: report.dirty, fromSync: true)
            }
        } catch let error where Self.cancelled(error) {
            throw error
        } catch {
            throw failed(error)
        }
    }

    /// Every page upstream reports written gets a new version: cached copies
    /// and the copies leechers hold of it are stale from now on. So does every
    /// page of memory that appeared since the last layout (see below).
    ///
    /// Reports must be applied in the order upstream made them, and none may
    /// be skipped: the layouts they carry are the only record of memory that
    /// vanished and came back (`finalize` waits for the Sync in flight).
    func apply(epoch: UInt64, layout: [Region]?, dirty: [AddressRange], fromSync: Bool = false) {
        state.withLock { s in
            // Nothing upstream said before the freeze can follow its reply.
            if fromSync && s.finalized != nil { return }
            var changed: [AddressRange] = []
            if let layout {
                // Memory that appeared, or whose backing changed, is new: what
                // the hub cached or found unmapped at those addresses belongs
                // to an earlier mapping. Upstream does not report it dirty:
                // for the seeder, pages of a new mapping were never sent, so
                // they cannot have been written since. (A heap that shrinks
                // and grows back, a mapping unmapped and mapped again at the
                // same address: without this the hub served the old bytes,
                // or answered "unmapped" for a mapped page forever.)
                changed = LayoutChange.diff(old: s.layout, new: layout).newlyDirty
                s.layout = layout
                s.layoutEpoch = epoch
            }
            for range in Self.renewed(dirty + changed, layout: s.layout) {
                metrics.foundDirty(pages: Int(range.pageCount))
                var page = range.start
                while page < range.end {
                    s.versions[page, default: 0] &+= 1
                    page += pageSize
                }
            }
        }
    }

    /// The pages of `ranges` that get a new version: only pages the layout
    /// migrates can be dirty. A wider range, from a broken or hostile
    /// seeder, would make the hub walk (and count versions for) pages that
    /// do not exist: one range of 1 TiB is 268 million of them.
    static func renewed(_ ranges: [AddressRange], layout: [Region]) -> [AddressRange] {
        let migratable = Ranges.merge(layout.filter { $0.kind == .migrate }.map(\.range))
        return Ranges.intersect(Ranges.merge(ranges), migratable)
    }

    // MARK: Pages

    /// Rounds of fetching after the freeze before giving up. Versions only
    /// move then when the Finalize reply lands while a fetch is in flight, so
    /// a second round normally ends it; more means something is wrong.
    private static let maxFetchRounds = 8

    /// Makes sure every page of `pages` is cached at its current version,
    /// fetching what is missing once, however many leechers ask. Returns how
    /// many of `pages` were missing at the first look (the rest were served
    /// from the cache).
    @discardableResult
    func ensureCached(_ pages: [UInt64]) async throws -> Int {
        var firstMissing: Int? = nil
        for _ in 0..<Self.maxFetchRounds {
            let (versions, failure) = state.withLock { s -> ([UInt64: UInt32], String?) in
                var vs: [UInt64: UInt32] = [:]
                for page in pages where s.unmappedAt[page] != s.versions[page, default: 0] {
                    vs[page] = s.versions[page, default: 0]
                }
                return (vs, s.failure)
            }
            let missing = cache.missing(versions)
            let missedFirst = firstMissing ?? missing.count
            firstMissing = missedFirst
            if missing.isEmpty { return missedFirst }
            if let failure { throw RPCError(code: .unavailable, message: failure) }
            do {
                try await fetching.run(covering: missing, grouping: Self.batches) { [self] batch in try await fetch(batch) }
            } catch {
                throw passed(error)
            }
            // While the source runs, a page cached at an older version is
            // fine to serve: the leecher is told the version it got, so the
            // next dirty report names it. Chasing the newest version here
            // could fail a busy page for nothing.
            if state.withLock({ $0.phase == .tracking }) { return missedFirst }
            // After the freeze, pages reported dirty while in flight have a
            // newer version now: go round again.
        }
        throw RPCError(code: .unavailable, message: "pages of migration '\(name)' keep changing faster than the hub can fetch them")
    }

    /// Pages in address order, at most one upstream ReadAt's worth a batch.
    private static func batches(_ pages: [UInt64]) -> [[UInt64]] {
        let sorted = pages.sorted()
        return stride(from: 0, to: sorted.count, by: MigrationLimits.maxPagesPerRead).map {
            Array(sorted[$0..<min(sorted.count, $0 + MigrationLimits.maxPagesPerRead)])
        }
    }

    /// One upstream ReadAt of `pages` (sorted); stores each page at the
    /// version it had when asked.
    private func fetch(_ pages: [UInt64]) async throws {
        var ranges: [AddressRange] = []
        for page in pages { Ranges.append(AddressRange(start: page, end: page + pageSize), to: &ranges) }
        let (asked, frozen) = state.withLock { s -> ([UInt64: UInt32], Bool) in
            var vs: [UInt64: UInt32] = [:]
            for page in pages { vs[page] = s.versions[page, default: 0] }
            return (vs, s.phase == .frozen)
        }
        let parts = try await link.callParts(.readAt, ReadRequest(ranges: ranges).encode())
        metrics.fetchedUpstream(pages: asked.count, bytes: parts.reduce(0) { $0 + $1.count })
        let unmapped = try cache.store(parts, asked: asked)
        if frozen && !unmapped.isEmpty {
            state.withLock { s in
                for page in unmapped { s.unmappedAt[page] = asked[page] }
            }
        }
    }
}
