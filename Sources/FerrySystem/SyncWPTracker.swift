// The fallback tracker for kernels without WP_ASYNC: synchronous userfaultfd
// write-protection with a handler thread.
//
// Why: on 5.7+ (6.4+ for untouched anonymous pages, via WP_UNPOPULATED) a
// write to a protected page blocks the writer and queues a fault message.
// Our handler thread records the page, then unprotects it
// (UFFDIO_WRITEPROTECT mode 0), which wakes the writer. Recording happens
// before unprotecting, and `rearm`/`scan` remove pages from the set before
// protecting them again, so a write is either in the set or happened before
// the re-protection (and is in the copy made after it): never lost.
// The cost is a round trip through our thread per first write (about 6 µs
// on the same core, 100 µs across cores).
//
// MADV_DONTNEED / MADV_REMOVE (EVENT_REMOVE) marks the dropped pages dirty:
// they now read as zeros. munmap (EVENT_UNMAP) marks the range lost, so a
// mapping placed at the same address is registered again by the owner.
// Kernel: 5.7+. Capability: as Userfaultfd.swift.
#if canImport(Glibc)
import Glibc
#endif

/// `@unchecked Sendable` invariant: `dirtyPages`, `lostRanges` and
/// `handlerError` are only touched under `lock`; the other properties are
/// immutable after init; the handler thread is joined before `uffd` closes.
final class SyncWPTracker: DirtyTracker, @unchecked Sendable {
    let kind = TrackerKind.sync
    private let uffd: Userfaultfd
    private let pid: Int32
    private let lock = Lock()
    private var dirtyPages = Set<UInt64>()
    private var lostRanges: [AddressRange] = []
    private var handlerError: Error?
    private var handler: pthread_t?
    /// Written once by `close` to end the handler's poll.
    private let stopPipe: (read: Int32, write: Int32)

    init(uffd: Userfaultfd, pid: Int32) throws {
        self.uffd = uffd
        self.pid = pid
        var fds: [Int32] = [0, 0]
        try checkedCall("pipe", on: "the sync tracker of pid \(pid)") { pipe(&fds) }
        for fd in fds { _ = fcntl(fd, F_SETFD, FD_CLOEXEC) }
        stopPipe = (fds[0], fds[1])
        var thread = pthread_t()
        let context = Unmanaged.passRetained(self).toOpaque()
        let result = pthread_create(&thread, nil, { argument in
            // SAFETY: `argument` is the tracker retained below; released when the loop ends.
            let tracker = Unmanaged<SyncWPTracker>.fromOpaque(argument!).takeRetainedValue()
            tracker.handleFaults()
            return nil
        }, context)
        if result != 0 {
            Unmanaged<SyncWPTracker>.fromOpaque(context).release()
            Glibc.close(fds[0]); Glibc.close(fds[1])
            throw SystemError(operation: "pthread_create", target: "the sync tracker of pid \(pid)", errno: result)
        }
        handler = thread
    }

    func close() {
        let thread: pthread_t? = lock.withLock {
            defer { handler = nil }
            return handler
        }
        guard let thread else { return }
        var byte: UInt8 = 1
        _ = Glibc.write(stopPipe.write, &byte, 1)
        pthread_join(thread, nil)
        Glibc.close(stopPipe.read)
        Glibc.close(stopPipe.write)
        uffd.close()
    }

    func track(_ range: AddressRange) throws {
        try uffd.register(range)
        try uffd.writeProtect(range, protect: true)
    }

    func rearm(_ ranges: [AddressRange]) throws {
        // Forget first, protect second: see the file comment.
        lock.withLock {
            for range in ranges {
                var page = range.start / pageSize
                while page < range.end / pageSize {
                    dirtyPages.remove(page)
                    page += 1
                }
            }
        }
        for range in ranges {
            do { try uffd.writeProtect(range, protect: true) } catch let error as SystemError where error.errno == ENOENT {
                continue // unmapped meanwhile: the reader reports it vanished
            }
        }
    }

    func untrack(_ range: AddressRange) throws {
        try uffd.unregister(range)
    }

    func scan(_ ranges: [AddressRange]) throws -> DirtyScan {
        let (pages, lost, error) = lock.withLock {
            defer { dirtyPages.removeAll(keepingCapacity: true); lostRanges.removeAll() }
            return (dirtyPages, lostRanges, handlerError)
        }
        if let error { throw error }
        let dirty = Ranges.intersect(Ranges.fromPages(pages), ranges)
        for range in dirty {
            do { try uffd.writeProtect(range, protect: true) } catch let error as SystemError where error.errno == ENOENT {
                continue // unmapped meanwhile; the layout refresh reports it
            }
        }
        return DirtyScan(dirty: dirty, lost: Ranges.intersect(Ranges.merge(lost), ranges))
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
                    let ready = poll(&fds, 2, retry.isEmpty ? -1 : 1)
                    if ready < 0 {
                        if errno == EINTR { continue }
                        throw SystemError(operation: "poll userfaultfd", target: "pid \(pid)", errno: errno)
                    }
                    if fds[1].revents != 0 { return }
                    if fds[0].revents & Int16(POLLERR | POLLHUP) != 0 { return }
                    events.removeAll(keepingCapacity: true)
                    try readEvents(fd: fd, into: &events)
                    retry = try handle(events, retry: retry)
                }
            }
        } catch {
            lock.withLock { handlerError = error }
        }
    }

    private func readEvents(fd: Int32, into events: inout [UserfaultfdEvent]) throws {
        // Userfaultfd.readEvents takes the read lock again; glibc's default
        // rwlock prefers readers, so a second read lock by this thread cannot deadlock.
        try uffd.readEvents(into: &events)
    }

    /// Records `events`, unprotects their pages and those of `retry`; returns the pages to retry.
    private func handle(_ events: [UserfaultfdEvent], retry: [UInt64]) throws -> [UInt64] {
        var unprotect = retry
        var again: [UInt64] = []
        lock.withLock {
            for event in events {
                switch event {
                case .pageFault(let address, let writeProtect):
                    dirtyPages.insert(address / pageSize)
                    if writeProtect { unprotect.append(address) }
                case .remove(let range):
                    let aligned = Ranges.pageAligned(range)
                    for page in (aligned.start / pageSize)..<(aligned.end / pageSize) { dirtyPages.insert(page) }
                case .unmap(let range):
                    lostRanges.append(Ranges.pageAligned(range))
                case .remap(_, let to, let length):
                    lostRanges.append(Ranges.pageAligned(AddressRange(start: to, end: to + length)))
                case .other:
                    break
                }
            }
        }
        // Unprotect after recording: the writer wakes and writes only now.
        for address in unprotect {
            do {
                try uffd.writeProtect(AddressRange(start: address, end: address + pageSize), protect: false)
            } catch let error as SystemError where error.errno == EAGAIN {
                again.append(address)
            } catch let error as SystemError where error.errno == ENOENT {
                continue // unmapped meanwhile: the writer is woken by the unmap
            }
        }
        return again
    }
}
