// Where a leecher's pages go, decided once when the leecher is made: an
// image directory (ImageWriter, `--out`), or live memory that a program uses
// from the moment Finalize returns (LiveMemorySink, `--into` or in-process).
// The puller and the leecher speak only to this protocol, so a third kind of
// destination (a restored process whose lazy-pages daemon is served from the
// pre-copied pages) conforms to it without touching either: it installs the
// pages it is given, learns at Finalize which ones are remote from then on,
// reports the pages its consumer wants now through `urgentPages`, says when
// everything is local, and poisons what never arrived when the migration fails.
import Synchronization

/// A destination of the leecher's pages: what it stores (`PageSink`), and
/// the steps of a migration it takes part in.
///
/// Threading: every call comes from the leecher's task, in migration order.
protocol Destination: PageSink {
    /// The first layout is known, before anything is pulled (the source runs
    /// on untouched): refuse what could only fail after the freeze.
    func check(layout: [Region]) throws

    /// Pages a consumer of this destination touched before they arrived, for
    /// the puller to fetch ahead of its background order; nil when nothing
    /// consumes the pages before the migration ends.
    var urgentPages: UrgentPages? { get }

    /// Whether the post-copy background fill is held back (only touched
    /// pages are fetched meanwhile).
    var backgroundFillPaused: Bool { get }

    /// Every page is stored: complete the destination for the final `layout`
    /// and describe it, with the BLAKE2b-256 of each migrated region, to be
    /// compared with the frozen source. Nothing is permanent until `commit`.
    func complete(layout: [Region], sourcePid: Int32, sourceHost: String, tracker: String,
                  downtimeMilliseconds: Double) async throws -> Manifest

    /// Verified and confirmed to the seeder: make the result permanent.
    func commit() throws

    /// The migration failed: consumers waiting for pages get `reason`, and
    /// pages that never arrived are never taken for data.
    func fail(_ reason: String)
}

extension Destination {
    func check(layout: [Region]) throws {}
    var urgentPages: UrgentPages? { nil }
    var backgroundFillPaused: Bool { false }
    func fail(_ reason: String) {}
}

extension ImageWriter: Destination {
    func complete(layout: [Region], sourcePid: Int32, sourceHost: String, tracker: String,
                  downtimeMilliseconds: Double) async throws -> Manifest {
        try await prepare(layout: layout, sourcePid: sourcePid, sourceHost: sourceHost, tracker: tracker,
                          downtimeMilliseconds: downtimeMilliseconds)
    }
}

/// Pages touched before they arrived, waiting for the leecher's puller.
final class UrgentPages: Sendable {
    private struct State {
        var pages: [UInt64] = []
        var waiter: CheckedContinuation<[UInt64], Never>?
        var closed = false
    }
    private let state = Mutex(State())

    func push(_ page: UInt64) {
        let waiter = state.withLock { s -> CheckedContinuation<[UInt64], Never>? in
            if let waiter = s.waiter {
                s.waiter = nil
                return waiter
            }
            s.pages.append(page)
            return nil
        }
        waiter?.resume(returning: [page])
    }

    /// Waits for the next touched pages; empty when cancelled or closed.
    func next() async -> [UInt64] {
        await withTaskCancellationHandler {
            await withCheckedContinuation { continuation in
                let taken = state.withLock { s -> [UInt64]? in
                    guard s.pages.isEmpty && !s.closed && !Task.isCancelled else {
                        defer { s.pages.removeAll() }
                        return s.pages
                    }
                    s.waiter = continuation
                    return nil
                }
                if let taken { continuation.resume(returning: taken) }
            }
        } onCancel: {
            close()
        }
    }

    /// Ends every wait, now and later.
    func close() {
        let waiter = state.withLock { s in
            s.closed = true
            defer { s.waiter = nil }
            return s.waiter
        }
        waiter?.resume(returning: [])
    }
}
