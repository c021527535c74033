// The post-copy fault handler thread: reads missing-page faults, reports
// each page once to the callback, and poisons pages that waited too long.
#if canImport(Glibc)
import Glibc
#endif
internal import CFerryLinux
import FerryToolkit
import Synchronization

extension MissingFaultMemory {
    /// Starts the handler thread: each touched missing page is reported once
    /// to `onFault` (source address, aligned to the page size of its mapping:
    /// a huge page is reported by its start), from the handler thread;
    /// `onFault` should return quickly (queue a fetch, or install at once).
    public func start(onFault: @escaping @Sendable (UInt64) -> Void) throws {
        try state.withLock { state in
            guard state.handler == nil else { return }
            state.onFault = onFault
            // The thread keeps the memory alive until its loop ends.
            state.handler = try startThread(for: "the post-copy fault handler of \(owner)") { [self] in handleFaults() }
        }
    }

    /// Stops the handler thread. Pages still missing stay registered: a
    /// touch then blocks until an install or `fail`. Call `finish()` instead
    /// once every page is installed.
    public func stopHandler() {
        let thread: pthread_t? = state.withLock { state in
            defer { state.handler = nil }
            return state.handler
        }
        guard let thread else { return }
        stopPipe.stop(joining: thread)
    }

    /// Ends post-copy: stops the handler, closes the descriptor and
    /// dismisses the guardian (waiting for it to exit), which unregisters
    /// the regions; pages not installed by then are poisoned first, so
    /// nothing reads zeros that the source did not hold. The memory stays
    /// mapped and belongs to the program.
    public func finish() {
        if !isComplete { fail("post-copy ended before every page arrived") }
        stopHandler()
        uffd.close()
        guardian?.dismiss()
    }

    /// The pid of the guardian process, for memory in another process.
    public var guardianPid: Int32? { guardian?.pid }

    /// Unmaps the regions (once). Only for memory nobody touches any more.
    public func unmap() {
        let doIt: Bool = state.withLock { state in
            defer { state.unmapped = true }
            return !state.unmapped
        }
        guard doIt else { return }
        finish()
        unmapper(mappings)
    }

    /// The handler thread: read fault messages, report each page once, and
    /// poison pages that waited longer than `faultTimeout`.
    private func handleFaults() {
        var events: [UserfaultfdEvent] = []
        events.reserveCapacity(64)
        let timeoutMs = (faultTimeout / 4).milliseconds(clampedTo: Int32(1)...50)
        handlerThread.store(pthread_self(), ordering: .relaxed)
        defer { handlerThread.store(0, ordering: .relaxed) }
        do {
            try uffd.withDescriptor { fd in
                var fds = [pollfd(fd: fd, events: Int16(POLLIN), revents: 0),
                           pollfd(fd: stopPipe.read, events: Int16(POLLIN), revents: 0)]
                while true {
                    let anyPending = state.withLock { !$0.pending.isEmpty }
                    try checkedCall("poll userfaultfd", on: owner) { poll(&fds, 2, anyPending ? timeoutMs : -1) }
                    if fds[1].revents != 0 { return }
                    if fds[0].revents & Int16(POLLERR | POLLHUP) != 0 { return }
                    events.removeAll(keepingCapacity: true)
                    if fds[0].revents != 0 { try uffd.readEvents(into: &events) }
                    handle(events)
                    expireTimedOutFaults()
                }
            }
        } catch {
            // The descriptor is gone or broken: nothing more can be resolved.
            fail("the fault handler stopped: \(error)")
        }
    }

    /// True on the handler thread while it runs.
    private var onHandlerThread: Bool { pthread_equal(pthread_self(), handlerThread.load(ordering: .relaxed)) != 0 }

    /// Records `events`; called on the handler thread.
    private func handle(_ events: [UserfaultfdEvent]) {
        assert(onHandlerThread, "fault events are handled on the handler thread only")
        var report: [UInt64] = []
        let callback: (@Sendable (UInt64) -> Void)? = state.withLock { state in
            let now = ContinuousClock.now
            for event in events {
                guard case .pageFault(let address, _) = event else { continue }
                state.stats.faults += 1
                guard let touched = sourceAddress(of: address), let mapping = self.mapping(containing: touched) else { continue }
                // The page of the mapping's size: a huge page is fetched and installed whole.
                let source = touched & ~(mapping.pageSize - 1)
                guard let (m, i) = locate(source) else { continue }
                let local = mapping.localAddress(of: source)
                if state.bit(m, i) {
                    // Installed between the touch and our read: the install woke it.
                    state.stats.faultsAlreadyResolved += 1
                    try? uffd.wake(AddressRange(start: local, end: local + mapping.pageSize))
                } else if state.pending[source] != nil {
                    state.stats.faultsCoalesced += 1
                } else {
                    state.pending[source] = now
                    state.stats.faultCallbacks += 1
                    report.append(source)
                }
            }
            return state.onFault
        }
        // Outside the lock: the callback may install at once.
        for source in report { callback?(source) }
    }

    /// Poisons pages waiting longer than `faultTimeout`; called on the handler thread.
    private func expireTimedOutFaults() {
        assert(onHandlerThread, "timeouts are enforced on the handler thread only")
        state.withLock { state in
            let now = ContinuousClock.now
            for (source, since) in state.pending where now - since >= faultTimeout {
                guard poison(AddressRange(start: source, end: source + pageSize), state: &state) > 0 else { continue }
                if state.failure == nil {
                    state.failure = .faultTimedOut(source: source, local: localAddress(of: source) ?? 0,
                                                   seconds: faultTimeout.inSeconds)
                }
            }
        }
    }
}
