// The fallback tracker for kernels without WP_ASYNC: synchronous userfaultfd
// write-protection with a handler thread.
//
// Why: on 5.7+ a write to a protected page blocks the writer and queues a
// fault message.
// Our handler thread records the page, then unprotects it
// (UFFDIO_WRITEPROTECT mode 0), which wakes the writer. Recording happens
// before unprotecting, and `rearm`/`scan` remove pages from the set before
// protecting them again, so a write is either in the set or happened before
// the re-protection (and is in the copy made after it): never lost.
// The cost is a round trip through our thread per first write (about 6 µs
// on the same core, 100 µs across cores).
//
// Empty anonymous pages (never touched, or emptied by MADV_DONTNEED, which
// drops the protection *after* we read its EVENT_REMOVE) cannot carry
// protection without WP_UNPOPULATED's pte markers, and markers cannot be
// combined with missing mode (a touch of a marker is a missing fault that
// UFFDIO_ZEROPAGE refuses: a livelock). So anonymous ranges are registered
// in missing mode as well, without markers: the first touch of an empty
// page faults, is recorded (a read counts too: conservative), and is
// resolved with the zero page. EVENT_REMOVE marks zapped pages dirty, since
// they now read as zeros. munmap (EVENT_UNMAP) marks the range lost, so a
// mapping placed at the same address is registered again by the owner.
//
// Hugetlb ranges are registered for write-protection only: their missing
// faults could not be resolved with the zero page (UFFDIO_ZEROPAGE is for
// 4 KiB memory), and they need no missing mode, since file-backed memory
// (hugetlbfs is a file system) carries protection in pte markers even where
// no page is present. A write fault there records and unprotects the whole
// huge page.
// Kernel: 5.7+. Capability: as Userfaultfd.swift.
#if canImport(Glibc)
import Glibc
#endif
import FerryToolkit
import Synchronization

/// The mutable state lives in one `Mutex`; the other properties are
/// immutable after init; the handler thread is joined before `uffd` closes.
final class SyncWPTracker: DirtyTracker {
    let kind = TrackerKind.sync
    private let uffd: Userfaultfd
    private let pid: Int32

    private struct State {
        var dirtyPages = Set<UInt64>()
        var lostRanges: [AddressRange] = []
        /// The hugetlb ranges registered: faults there dirty and unprotect whole huge pages.
        var hugePages = HugePageMap()
        var handlerError: Error?
        var handler: pthread_t?

        /// Records every 4 KiB page of `range` as written.
        mutating func insertDirty(_ range: AddressRange) {
            for page in (range.start / pageSize)..<(range.end / pageSize) { dirtyPages.insert(page) }
        }
    }
    private let state = Mutex(State())
    /// Written once by `close` to end the handler's poll.
    private let stopPipe: StopPipe

    init(uffd: Userfaultfd, pid: Int32) throws {
        self.uffd = uffd
        self.pid = pid
        stopPipe = try StopPipe(for: "the sync tracker of pid \(pid)")
        do {
            // The thread keeps the tracker alive until its loop ends.
            let thread = try startThread(for: "the sync tracker of pid \(pid)") { [self] in handleFaults() }
            state.withLock { $0.handler = thread }
        } catch {
            stopPipe.close()
            throw error
        }
    }

    func close() {
        let thread: pthread_t? = state.withLock { state in
            defer { state.handler = nil }
            return state.handler
        }
        guard let thread else { return }
        stopPipe.stop(joining: thread)
        stopPipe.close()
        uffd.close()
    }

    func track(_ range: AddressRange, pageSize: UInt64) throws {
        if pageSize > FerrySystem.pageSize {
            // Hugetlb: write-protection only (see the file comment). Known
            // before the first fault can come, so the handler aligns it.
            try uffd.register(range)
            state.withLock { $0.hugePages.add(range, size: pageSize) }
        } else {
            do {
                try uffd.register(range, missing: true)
            } catch let error as SystemError where error.errno == EINVAL {
                // Missing mode is for anonymous memory (shmem needs a feature we
                // do not ask for); shared pages keep their contents when zapped.
                try uffd.register(range)
            }
        }
        try uffd.writeProtect(range, protect: true)
    }

    func rearm(_ ranges: [AddressRange]) throws {
        let merged = Ranges.merge(ranges)
        try protect(merged) { state in
            // Forget first, protect second, both under the lock: see the file comment.
            let pageCount = merged.reduce(0) { $0 + $1.pageCount }
            if pageCount > UInt64(state.dirtyPages.count) {
                state.dirtyPages = state.dirtyPages.filter { page in !Ranges.contains(merged, page * pageSize) }
            } else {
                for range in merged {
                    for page in (range.start / pageSize)..<(range.end / pageSize) { state.dirtyPages.remove(page) }
                }
            }
        }
    }

    /// Runs `prepare` and then write-protects `ranges`, all while holding
    /// the state's lock, so no handler can record-and-unprotect in between. When the
    /// kernel says the map is busy (EAGAIN: an event our handler has not read
    /// yet), the lock is let go so the handler can read it, and the remaining
    /// ranges are protected after a short pause.
    ///
    /// ENOENT means some mapping in the range is not registered (replaced
    /// since we registered it; the UNMAP event makes the owner register it
    /// again). The kernel protects the mappings before that one and stops, so
    /// a range is then protected page by page, and a page that cannot be
    /// protected is recorded as written: unprotected, its next write would
    /// raise no fault, and a copy of it must not count as current.
    private func protect(_ ranges: [AddressRange], prepare: (inout State) -> Void) throws {
        var remaining = state.withLock { $0.hugePages.split(ranges) }[...]
        var prepared = false
        var attempts = 0
        while true {
            let busy: Bool = try state.withLock { state in
                if !prepared { prepare(&state); prepared = true }
                while let range = remaining.first {
                    do {
                        try uffd.writeProtect(range, protect: true, waitWhileBusy: false)
                    } catch let error as SystemError where error.errno == EAGAIN {
                        return true
                    } catch let error as SystemError where error.errno == ENOENT {
                        remaining.removeFirst()
                        let pages = state.hugePages.pages(of: range)
                        if pages.count > 1 {
                            remaining = (pages + remaining)[...]
                        } else {
                            state.insertDirty(range)
                        }
                        continue
                    }
                    remaining.removeFirst()
                }
                return false
            }
            if !busy { return }
            attempts += 1
            if attempts > Userfaultfd.busyRetries {
                throw SystemError(operation: "UFFDIO_WRITEPROTECT", target: "pid \(pid)", errno: EAGAIN,
                                  hint: "the process's memory map kept changing")
            }
            usleep(attempts < 10 ? 0 : 100)
        }
    }

    func untrack(_ range: AddressRange) throws {
        try uffd.unregister(range)
        // Faults recorded in the range belong to the tracking that ended.
        state.withLock { state in
            state.dirtyPages = state.dirtyPages.filter { !range.contains($0 * pageSize) }
            state.hugePages.remove(range)
        }
    }

    func scan(_ ranges: [AddressRange], rearm: Bool) throws -> DirtyScan {
        let (taken, lost, failure) = state.withLock { state in
            let pages = state.dirtyPages
            let lost = state.lostRanges
            state.dirtyPages.removeAll(keepingCapacity: true)
            state.lostRanges.removeAll()
            return (Ranges.intersect(Ranges.fromPages(pages), ranges), lost, state.handlerError)
        }
        if let failure { throw failure }
        // The set was emptied under the lock and the pages are protected
        // again before any handler can record-and-unprotect in between; if
        // the map is busy the protection finishes after the handler caught up
        // (faults meanwhile are recorded in the new set).
        // Without rearm the pages stay writable and out of the set: reported
        // once, and watched again from the next `rearm` (the owner keeps them dirty).
        if rearm { try protect(taken) { _ in } }
        return DirtyScan(dirty: taken, lost: Ranges.intersect(Ranges.merge(lost), ranges))
    }

    /// The handler thread: poll, record, unprotect (which wakes the writer).
    private func handleFaults() {
        var events: [UserfaultfdEvent] = []
        events.reserveCapacity(64)
        var retry: [UInt64] = []
        do {
            try uffd.withDescriptor { fd in
                var fds = [pollfd(fd: fd, events: Int16(POLLIN), revents: 0),
                           pollfd(fd: stopPipe.read, events: Int16(POLLIN), revents: 0)]
                while true {
                    // Unprotects refused with EAGAIN (the target's memory map is
                    // changing until we read its event) are retried soon.
                    try checkedCall("poll userfaultfd", on: "pid \(pid)") { poll(&fds, 2, retry.isEmpty ? -1 : 1) }
                    if fds[1].revents != 0 { return }
                    if fds[0].revents & Int16(POLLERR | POLLHUP) != 0 { return }
                    // Read and record under one hold of the lock: reading an
                    // UNMAP event lets the unmapping thread go on (and map
                    // something new at the same place), so a scan must never
                    // fall between the read and the record, or it would miss
                    // the lost range; at Finalize that scan is the last one.
                    retry = try state.withLock { state in
                        events.removeAll(keepingCapacity: true)
                        try readEvents(fd: fd, into: &events)
                        return try handle(events, retry: retry, state: &state)
                    }
                }
            }
        } catch {
            state.withLock { $0.handlerError = error }
        }
    }

    private func readEvents(fd: Int32, into events: inout [UserfaultfdEvent]) throws {
        // Userfaultfd.readEvents takes the read lock again; that lock prefers
        // readers, so a second read lock by this thread cannot deadlock.
        try uffd.readEvents(into: &events)
    }

    /// Records `events`, unprotects their pages and those of `retry`; returns
    /// the pages to retry (missing-page ones tagged with bit 0). The caller
    /// holds the lock of `state`.
    private func handle(_ events: [UserfaultfdEvent], retry: [UInt64], state: inout State) throws -> [UInt64] {
        var unprotect: [UInt64] = []
        var missing: [UInt64] = []
        var again: [UInt64] = []
        // Recording and unprotecting happen under one hold of the lock, so a
        // scan or rearm (which empties the set and protects under the same
        // lock) never has its protection undone by an unprotect whose page
        // it did not see recorded. Retried pages are recorded again for that
        // reason: a scan may have taken them since.
        do {
            for address in retry {
                state.insertDirty(state.hugePages.page(at: address & ~1))
                if address & 1 == 0 { unprotect.append(address) } else { missing.append(address & ~1) }
            }
            for event in events {
                switch event {
                case .pageFault(let address, let writeProtect):
                    // A hugetlb fault dirties (and unprotects) its whole huge page.
                    let page = state.hugePages.page(at: address)
                    state.insertDirty(page)
                    if writeProtect { unprotect.append(page.start) } else { missing.append(address) }
                case .remove(let range):
                    for piece in state.hugePages.split([Ranges.pageAligned(range)]) { state.insertDirty(piece) }
                case .unmap(let range):
                    state.lostRanges.append(Ranges.pageAligned(range))
                case .remap(_, let to, let length):
                    state.lostRanges.append(Ranges.pageAligned(AddressRange(start: to, end: to + length)))
                case .fork(let child):
                    Glibc.close(child)  // never asked for (no fork events): not ours to follow
                case .other:
                    break
                }
            }
            // Unprotect after recording: the writer wakes and writes only now.
            for address in unprotect {
                do {
                    try uffd.writeProtect(state.hugePages.page(at: address), protect: false, waitWhileBusy: false)
                } catch let error as SystemError where error.errno == EAGAIN {
                    again.append(address)
                } catch let error as SystemError where error.errno == ENOENT {
                    continue // unmapped meanwhile: the writer is woken by the unmap
                }
            }
            // Missing pages: the zero page, or a plain wake when another
            // thread populated the page meanwhile.
            for address in missing {
                let page = AddressRange(start: address, end: address + pageSize)
                do {
                    try uffd.zeroPage(page)
                } catch let error as SystemError where error.errno == EEXIST {
                    try? uffd.wake(page)
                } catch let error as SystemError where error.errno == EAGAIN {
                    again.append(address | 1)
                } catch let error as SystemError where error.errno == ENOENT {
                    continue
                }
            }
        }
        return again
    }
}
