// `StreamTransport` on the loop thread: reading and decoding frames,
// batching writes into `uv_write`, and closing the handles (see
// StreamTransport.swift for the threads and the memory bounds).

internal import CUV
import Glibc
import Synchronization
import FerryToolkit

extension StreamTransport {
    // MARK: Reading (loop thread)

    func didRead(_ event: UVReadEvent) {
        switch event {
        case .bytes(let bytes):
            process(bytes)
        case .direct(let n):
            var frames: [[UInt8]] = []
            decoder.bodyReceived(n) { frames.append($0) }
            if !frames.isEmpty { handOver(frames, oversized: nil) }
        case .eof:
            do {
                try decoder.finish()
                endReading(.eof)
            } catch .closedMidFrame(let received, let expected) {
                endReading(.failed(TransportError.truncatedFrame(peer: peerDescription, expected: expected, received: received)))
            } catch {
                // An oversized header is pending: the stream also ended, so the
                // frame can never arrive whatever the limit becomes.
                endReading(.failed(TransportError.truncatedFrame(peer: peerDescription, expected: decoder.oversizedAnnouncement ?? 0, received: 0)))
            }
        case .error(let e):
            if e.code == Int32(UV_ECONNRESET.rawValue) {
                endReading(.failed(SocketError.connectionReset(peer: peerDescription)))
            } else {
                endReading(.failed(SocketError.readFailed(peer: peerDescription, e)))
            }
        }
    }

    func endReading(_ end: ReadEnd) {
        input?.stopReading()
        let receiver = state.withLock { s -> CheckedContinuation<[UInt8]?, any Error>? in
            if s.readEnd == nil { s.readEnd = end }
            if s.inboxCount == 0, let r = s.receiver {
                s.receiver = nil
                return r
            }
            return nil
        }
        guard let receiver else { return }
        switch end {
        case .eof: receiver.resume(returning: nil)
        case .failed(let e): receiver.resume(throwing: e)
        }
    }

    /// Decodes `bytes` and hands the frames over. Returns false if decoding
    /// stopped at an oversized header (reading is then stopped).
    @discardableResult
    func process(_ bytes: UnsafeRawBufferPointer) -> Bool {
        decoder.maxFrameSize = limit.load(ordering: .relaxed)
        var frames: [[UInt8]] = []
        let consumed = decoder.feed(bytes) { frames.append($0) }
        let oversized = decoder.oversizedAnnouncement
        if oversized != nil {
            // Keep what follows the header; it is decoded if the limit is raised.
            stash = Array(UnsafeRawBufferPointer(rebasing: bytes[consumed...]))
            input?.stopReading()
        }
        if frames.isEmpty && oversized == nil { return true }
        handOver(frames, oversized: oversized)
        return oversized == nil
    }

    /// Reads of at least this many bytes go straight into the frame body
    /// (no copy through the read buffer); smaller remainders are not worth a
    /// separate read.
    static let directReadMinimum = 64 << 10

    func directReadRegion() -> UnsafeMutableRawBufferPointer? {
        decoder.bodyRegion(minimum: Self.directReadMinimum)
    }

    /// Queues decoded frames for `receive` (and hands one to a waiting receiver).
    func handOver(_ frames: [[UInt8]], oversized: Int?) {
        var effects = Effects()
        var pause = false
        let handoff = state.withLock { s -> (CheckedContinuation<[UInt8]?, any Error>, Next)? in
            if s.closed || s.failure != nil { return nil }
            for f in frames {
                s.inbox.append(.frame(f))
                s.inboxBytes += f.count
            }
            if let n = oversized {
                s.inbox.append(.oversized(n))
                s.decoderBlocked = true
            }
            if !s.readPaused && (s.inboxBytes > Self.receiveHighWater || s.inboxCount > Self.receiveMaxFrames) {
                s.readPaused = true
                pause = true
            }
            if let r = s.receiver {
                let n = nextLocked(&s, &effects)
                if case .wait = n { return nil }
                s.receiver = nil
                return (r, n)
            }
            return nil
        }
        if pause { input?.stopReading() }
        perform(effects)
        if let (c, n) = handoff { Self.resume(c, with: n) }
    }

    func resumeReading() {
        let go = state.withLock { s -> Bool in
            s.readResumeScheduled = false
            guard s.readPaused, !s.decoderBlocked, s.readEnd == nil, !s.closed else { return false }
            if s.inboxBytes > Self.receiveLowWater || s.inboxCount > Self.receiveResumeFrames { return false }
            s.readPaused = false
            return true
        }
        if go { startReading() }
    }

    /// The consumer reached an oversized header and the limit now allows it.
    func resumeDecoder() {
        decoder.maxFrameSize = limit.load(ordering: .relaxed)
        guard decoder.resume() else {
            // Lowered again in between: the frame is refused after all.
            let n = decoder.oversizedAnnouncement ?? 0
            fail(TransportError.frameTooLarge(peer: peerDescription, size: n, limit: decoder.maxFrameSize))
            return
        }
        state.withLock { $0.decoderBlocked = false }
        let pending = stash
        stash = []
        let unblocked = pending.withUnsafeBytes { process($0) }
        // Processing the stash may itself have paused reading.
        let paused = state.withLock { s in s.readPaused || s.closed || s.readEnd != nil || s.failure != nil }
        if unblocked && !paused { startReading() }
    }

    /// Starts (or restarts) reading; "already reading" is not an error.
    func startReading() {
        guard let input, !input.isClosing else { return }
        let rc = input.startReading()
        if rc != 0 && rc != Int32(UV_EALREADY.rawValue) {
            fail(SocketError.readFailed(peer: peerDescription, UVError(rc)))
        }
    }

    // MARK: Writing (loop thread)

    func flush() {
        guard let output, !output.isClosing else {
            state.withLock { $0.flushScheduled = false }
            return
        }
        let (frames, skip) = state.withLock { s -> ([[UInt8]], Int) in
            s.flushScheduled = false
            // A direct writer is mid-sendmsg: it schedules a flush when done.
            if !s.opened || s.directWriter || s.outbox.isEmpty { return ([], 0) }
            let taken = (s.outbox, s.outboxSkip)
            s.outbox = []
            s.outboxSkip = 0
            s.writesInFlight += (taken.0.count + Self.maxFramesPerWrite - 1) / Self.maxFramesPerWrite
            return taken
        }
        guard !frames.isEmpty else { return }
        var start = 0
        while start < frames.count {
            let end = min(frames.count, start + Self.maxFramesPerWrite)
            let chunk = end - start == frames.count ? frames : Array(frames[start ..< end])
            let first = start == 0 ? skip : 0
            let bytes = chunk.reduce(0) { $0 + $1.count + FrameDecoder.headerSize } - first
            let rc = output.writeFrames(chunk, skipFirst: first) { [self] status in self.didWrite(bytes: bytes, status: status) }
            if rc != 0 {
                let unsent = (frames.count - start + Self.maxFramesPerWrite - 1) / Self.maxFramesPerWrite
                state.withLock { $0.writesInFlight -= unsent }
                fail(writeError(rc))
                return
            }
            start = end
        }
    }

    func writeError(_ code: Int32) -> any Error {
        if code == Int32(UV_EPIPE.rawValue) || code == Int32(UV_ECONNRESET.rawValue) {
            return TransportError.peerClosed(peer: peerDescription)
        }
        return SocketError.writeFailed(peer: peerDescription, UVError(code))
    }

    func didWrite(bytes: Int, status: Int32) {
        let woken = state.withLock { s -> [CheckedContinuation<Void, any Error>] in
            s.queuedBytes -= bytes
            s.writesInFlight -= 1
            guard s.queuedBytes <= Self.sendLowWater, !s.senders.isEmpty else { return [] }
            defer { s.senders = [] }
            return s.senders.map(\.continuation)
        }
        for w in woken { w.resume() }
        if status != 0 && status != UVError.canceled {
            fail(writeError(status))
        }
    }

    // MARK: Closing (loop thread)

    /// Local close: write what `send` already accepted, shut the write side
    /// down so the peer reads a clean end of stream, then close the handles.
    func closeGracefully() {
        let busy = state.withLock { s -> Bool in
            if s.directWriter {
                // Never shut down or close under a sendmsg in progress; the
                // writer calls us again when it is done.
                if s.deferredClose == nil { s.deferredClose = .graceful }
                return true
            }
            s.directFD = -1
            return false
        }
        if busy { return }
        flush()
        input?.stopReading()
        guard let output, !output.isClosing else {
            closeHandlesNow()
            return
        }
        if let input, input !== output { input.close() }
        let rc = output.shutdown { [self] _ in self.closeHandlesNow() }
        if rc != 0 {
            closeHandlesNow()
            return
        }
        // A peer that never reads would hold the shutdown (and the descriptor) forever.
        let timer = UVTimer(loop: loop)
        lingerTimer = timer
        timer.start(milliseconds: Self.closeLingerMilliseconds) { [self] in self.closeHandlesNow() }
    }

    /// Test hook: what this transport's descriptors point at ("socket:[123]"),
    /// to check after closing that none is still open.
    func descriptorLinks() async throws -> [String] {
        try await loop.submit { [self] in
            var links: [String] = []
            for stream in [input, output].compactMap({ $0 }) {
                guard let fd = stream.descriptor else { continue }
                var buf = [CChar](repeating: 0, count: 256)
                let n = readlink("/proc/self/fd/\(fd)", &buf, buf.count - 1)
                if n > 0 { links.append(String(decoding: buf[0 ..< n].map { UInt8(bitPattern: $0) }, as: UTF8.self)) }
            }
            return Array(Set(links))
        }
    }

    func closeHandlesNow() {
        let busy = state.withLock { s -> Bool in
            if s.directWriter {
                // Closing now could let the writer's descriptor number be reused
                // under it; the writer calls us again when it is done.
                s.deferredClose = .now
                return true
            }
            s.directFD = -1
            return false
        }
        if busy { return }
        input?.close()
        output?.close()
        lingerTimer?.close()
        lingerTimer = nil
    }
}
