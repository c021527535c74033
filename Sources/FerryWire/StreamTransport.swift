// `FrameTransport` over libuv streams: TCP, Unix sockets, pipes and terminals.
//
// Threads: the handles, the decoder and the write calls live on the loop
// thread. Swift tasks call `send`/`receive` from anywhere; they meet the loop
// thread in `State`, a Mutex holding the frames received but not yet taken,
// the frames queued but not yet handed to libuv, and the waiting
// continuations. A frame that is already buffered is returned without any
// thread hop. A send finding nothing queued is written directly from the
// sending thread (`writeDirectly`); otherwise sends are batched into one
// `uv_write` per loop turn.
//
// Frame size limit: a header over the limit stops decoding (and reading)
// right there, before any allocation; the verdict is given when `receive`
// reaches that frame, against the limit as it is then. So the secure channel
// can raise the limit after the handshake even if the peer's first large
// frame was already read behind the last handshake message.
//
// Memory is bounded both ways:
// - send: `send` suspends while more than `sendHighWater` bytes are queued or
//   in flight in libuv, and resumes below `sendLowWater`;
// - receive: reading stops (`uv_read_stop`) while more than
//   `receiveHighWater` bytes or `receiveMaxFrames` frames wait to be taken,
//   so a fast peer fills its own socket buffer instead of our heap; and a
//   frame header over the limit stops decoding before anything is allocated.

internal import CUV
import Glibc
import Synchronization

final class StreamTransport: FrameTransport, @unchecked Sendable {
    // Invariant for @unchecked Sendable: members marked "loop thread" are used
    // only on `loop`'s thread; everything shared is inside `state` (a Mutex)
    // or `limit` (an Atomic); the rest are immutable.

    /// Bytes queued for sending above which `send` suspends. 8 MiB keeps a
    /// loopback or LAN pipe full (several socket buffers' worth) while bounding
    /// what a stalled peer can make us hold.
    static let sendHighWater = 8 << 20
    /// `send` resumes once the queue drains below this: 2 MiB leaves libuv
    /// enough to keep writing while the woken senders produce more.
    static let sendLowWater = 2 << 20
    /// Undelivered received bytes above which we stop reading the socket.
    static let receiveHighWater = 8 << 20
    static let receiveLowWater = 2 << 20
    /// Undelivered frames above which we stop reading (small-frame floods).
    static let receiveMaxFrames = 4096
    static let receiveResumeFrames = 1024
    /// Frames per `uv_write`: two iovecs each, below Linux's IOV_MAX of 1024.
    static let maxFramesPerWrite = 256
    /// How long a graceful close waits for queued writes to reach a peer that
    /// does not read, before closing anyway.
    static let closeLingerMilliseconds: UInt64 = 5_000
    /// The limit before `setMaxIncomingFrameSize` is called: the handshake's,
    /// from the first byte read. Every stream carries a handshake first, and
    /// reading starts as soon as the handles are attached, before anyone can
    /// lower the limit: a larger default let an unauthenticated peer make us
    /// allocate a whole frame of it. The secure channel raises it once the
    /// peer is authenticated.
    static let defaultMaxIncomingFrameSize = WireLimits.handshakeMaxFrame

    let loop: EventLoop
    public let peerDescription: String

    // Loop thread.
    private var input: UVStream?
    private var output: UVStream?
    private var decoder: FrameDecoder
    private var stash: [UInt8] = []            // bytes after a header that stopped the decoder
    private var lingerTimer: UVTimer?

    private enum Item { case frame([UInt8]); case oversized(Int) }
    private enum DeferredClose { case graceful, now }
    private enum ReadEnd { case eof; case failed(any Error) }

    private struct State {
        var inbox: [Item] = []
        var head = 0
        var inboxBytes = 0
        var inboxCount: Int { inbox.count - head }
        var readEnd: ReadEnd? = nil
        var closed = false
        var failure: (any Error)? = nil
        var receiver: CheckedContinuation<[UInt8]?, any Error>? = nil
        var receiverID: UInt64 = 0
        var nextID: UInt64 = 0
        var outbox: [[UInt8]] = []
        var outboxSkip = 0                     // bytes of outbox[0] already written directly
        var queuedBytes = 0
        var flushScheduled = false
        var writesInFlight = 0                 // uv_write requests not yet called back
        var directFD: Int32 = -1               // socket usable for direct writes, or -1
        var directWriter = false               // a sender is in sendmsg on directFD
        var deferredClose: DeferredClose? = nil
        var senders: [(id: UInt64, continuation: CheckedContinuation<Void, any Error>)] = []
        var readPaused = false
        var readResumeScheduled = false
        var decoderBlocked = false
        var opened = false
    }
    private let state = Mutex(State())
    private let limit: Atomic<Int>

    private struct Effects {
        var resumeReading = false
        var resumeDecoder = false
        var failure: (any Error)? = nil
    }

    private enum Next {
        case frame([UInt8]), end, failed(any Error), wait
    }

    /// A transport whose handles are attached later by `attach` (on the loop thread).
    init(loop: EventLoop, peer: String) {
        self.loop = loop
        self.peerDescription = peer
        self.decoder = FrameDecoder(maxFrameSize: Self.defaultMaxIncomingFrameSize)
        self.limit = Atomic(Self.defaultMaxIncomingFrameSize)
    }

    deinit {
        // Dropped without close(): close the handles so descriptors do not leak.
        let input = self.input, output = self.output, timer = lingerTimer
        if input != nil || output != nil || timer != nil {
            loop.execute {
                input?.close()
                output?.close()
                timer?.close()
            }
        }
    }

    // MARK: Setting up (loop thread)

    /// Attaches the stream(s) and starts reading. `input` and `output` may be
    /// the same handle (sockets) or two (standard input and output).
    func attach(input: UVStream, output: UVStream) {
        self.input = input
        self.output = output
        input.onRead = { [weak self] event in self?.didRead(event) }
        input.readRegion = { [weak self] in self?.directReadRegion() }
        let socket = Self.directWrites ? output.directWriteSocket : nil
        let (closed, failed, pending) = state.withLock { s -> (Bool, Bool, Bool) in
            s.opened = true
            s.directFD = socket ?? -1
            return (s.closed, s.failure != nil, !s.outbox.isEmpty)
        }
        if failed {
            closeHandlesNow()
            return
        }
        // Closed before the handles arrived: the close job queued by close()
        // runs after this one and writes what send() accepted.
        if closed { return }
        let rc = input.startReading()
        if rc != 0 {
            fail(SocketError.readFailed(peer: peerDescription, UVError(rc)))
            return
        }
        if pending { flush() }
    }

    /// Opening the handles failed: every call throws `error`.
    func attachFailed(_ error: any Error) {
        fail(error)
    }

    // MARK: FrameTransport

    func setMaxIncomingFrameSize(_ bytes: Int) {
        limit.store(max(0, bytes), ordering: .relaxed)
    }

    func send(_ frame: [UInt8]) async throws {
        if frame.count > Int(UInt32.max) {
            throw SocketError.frameTooLargeToSend(peer: peerDescription, size: frame.count)
        }
        var schedule = false
        var direct: Int32 = -1
        let mustWait = try state.withLock { s throws -> Bool in
            if s.closed { throw TransportError.closed(peer: peerDescription) }
            if let failure = s.failure { throw failure }
            s.queuedBytes += frame.count + FrameDecoder.headerSize
            if s.directFD >= 0 && !s.directWriter && s.writesInFlight == 0 && s.outbox.isEmpty {
                // Nothing is queued before this frame: write it from this
                // thread, saving the hop to the loop thread.
                s.directWriter = true
                direct = s.directFD
                return false
            }
            s.outbox.append(frame)
            if !s.flushScheduled && s.opened {
                s.flushScheduled = true
                schedule = true
            }
            return s.queuedBytes > Self.sendHighWater
        }
        if direct >= 0 {
            // A failed direct write fails the transport and this send.
            if let error = writeDirectly(frame, to: direct) { throw error }
            return
        }
        if schedule { loop.execute { self.flush() } }
        if mustWait { try await waitForRoom() }
    }

    /// Direct writes: when the send queue is empty, `send` writes the frame
    /// with one non-blocking sendmsg on the calling thread, and hands only
    /// what the kernel did not take to the loop thread. This saves a thread
    /// hop per request (round-trip latency) and moves the copy into the
    /// kernel onto the sender's core (bulk throughput). Sockets only: a
    /// sendmsg with MSG_NOSIGNAL cannot raise SIGPIPE on this thread.
    static let directWrites = true

    private func writeDirectly(_ frame: [UInt8], to fd: Int32) -> (any Error)? {
        let h = FrameDecoder.header(forLength: frame.count)
        var prefix = (h.0, h.1, h.2, h.3)
        let total = frame.count + FrameDecoder.headerSize
        var written = 0
        var error: Int32 = 0
        withUnsafeMutableBytes(of: &prefix) { p in
            frame.withUnsafeBytes { payload in
                // SAFETY: both buffers outlive the sendmsg call; the kernel
                // copies what it takes before returning.
                var iov = (iovec(iov_base: p.baseAddress, iov_len: 4),
                           iovec(iov_base: UnsafeMutableRawPointer(mutating: payload.baseAddress), iov_len: payload.count))
                withUnsafeMutableBytes(of: &iov) { iovs in
                    var message = msghdr()
                    message.msg_iov = iovs.baseAddress!.assumingMemoryBound(to: iovec.self)
                    message.msg_iovlen = payload.isEmpty ? 1 : 2
                    while true {
                        let n = sendmsg(fd, &message, Int32(MSG_NOSIGNAL) | Int32(MSG_DONTWAIT))
                        if n >= 0 { written = n; return }
                        if errno == EINTR { continue }
                        if errno != EAGAIN && errno != EWOULDBLOCK { error = errno }
                        return
                    }
                }
            }
        }
        var scheduleFlush = false
        let (deferred, woken) = state.withLock { s -> (DeferredClose?, [CheckedContinuation<Void, any Error>]) in
            s.directWriter = false
            if error == 0 {
                s.queuedBytes -= written
                if written < total {
                    // The rest goes first, through libuv.
                    s.outbox.insert(frame, at: 0)
                    s.outboxSkip = written
                }
            }
            if error == 0 && !s.outbox.isEmpty && !s.flushScheduled {
                s.flushScheduled = true
                scheduleFlush = true
            }
            let d = s.deferredClose
            s.deferredClose = nil
            guard s.queuedBytes <= Self.sendLowWater, !s.senders.isEmpty else { return (d, []) }
            defer { s.senders = [] }
            return (d, s.senders.map(\.continuation))
        }
        for w in woken { w.resume() }
        var failure: (any Error)? = nil
        if error != 0 {
            let e = writeError(UVError.fromErrno(error))
            fail(e)
            failure = e
        }
        if scheduleFlush { loop.execute { self.flush() } }
        switch deferred {
        case .graceful: loop.execute { self.closeGracefully() }
        case .now: loop.execute { self.closeHandlesNow() }
        case nil: break
        }
        return failure
    }

    /// Backpressure: suspends until the send queue is below the low-water mark.
    private func waitForRoom() async throws {
        let id = state.withLock { s -> UInt64 in s.nextID += 1; return s.nextID }
        try await withTaskCancellationHandler {
            try await withCheckedThrowingContinuation { (c: CheckedContinuation<Void, any Error>) in
                let outcome: Result<Bool, any Error> = state.withLock { s in
                    if s.closed { return .failure(TransportError.closed(peer: peerDescription)) }
                    if let failure = s.failure { return .failure(failure) }
                    if Task.isCancelled { return .failure(CancellationError()) }
                    if s.queuedBytes <= Self.sendLowWater { return .success(true) }
                    s.senders.append((id, c))
                    return .success(false)
                }
                switch outcome {
                case .success(true): c.resume()
                case .success(false): break
                case .failure(let e): c.resume(throwing: e)
                }
            }
        } onCancel: {
            let c = state.withLock { s -> CheckedContinuation<Void, any Error>? in
                guard let i = s.senders.firstIndex(where: { $0.id == id }) else { return nil }
                return s.senders.remove(at: i).continuation
            }
            c?.resume(throwing: CancellationError())
        }
    }

    func receive() async throws -> [UInt8]? {
        var effects = Effects()
        let now = state.withLock { s in nextLocked(&s, &effects) }
        perform(effects)
        switch now {
        case .frame(let f): return f
        case .end: return nil
        case .failed(let e): throw e
        case .wait: break
        }
        let id = state.withLock { s -> UInt64 in s.nextID += 1; return s.nextID }
        return try await withTaskCancellationHandler {
            try await withCheckedThrowingContinuation { (c: CheckedContinuation<[UInt8]?, any Error>) in
                var effects = Effects()
                let now = state.withLock { s -> Next in
                    let n = nextLocked(&s, &effects)
                    guard case .wait = n else { return n }
                    if Task.isCancelled { return .failed(CancellationError()) }
                    if s.receiver != nil {
                        return .failed(WireUsageError("two concurrent receive() calls on the transport to \(peerDescription)"))
                    }
                    s.receiver = c
                    s.receiverID = id
                    return .wait
                }
                perform(effects)
                Self.resume(c, with: now)
            }
        } onCancel: {
            let c = state.withLock { s -> CheckedContinuation<[UInt8]?, any Error>? in
                guard s.receiverID == id, let r = s.receiver else { return nil }
                s.receiver = nil
                return r
            }
            c?.resume(throwing: CancellationError())
        }
    }

    private static func resume(_ c: CheckedContinuation<[UInt8]?, any Error>, with next: Next) {
        switch next {
        case .frame(let f): c.resume(returning: f)
        case .end: c.resume(returning: nil)
        case .failed(let e): c.resume(throwing: e)
        case .wait: break
        }
    }

    /// Takes the next thing `receive` should return, with the state locked.
    private func nextLocked(_ s: inout State, _ effects: inout Effects) -> Next {
        if s.closed { return .end }
        if s.inboxCount > 0 {
            switch s.inbox[s.head] {
            case .frame(let f):
                s.inbox[s.head] = .frame([])
                s.head += 1
                s.inboxBytes -= f.count
                if s.head == s.inbox.count {
                    s.inbox.removeAll(keepingCapacity: true)
                    s.head = 0
                } else if s.head >= 1024 && s.head * 2 >= s.inbox.count {
                    s.inbox.removeFirst(s.head)
                    s.head = 0
                }
                if s.readPaused && !s.readResumeScheduled && s.readEnd == nil
                    && s.inboxBytes <= Self.receiveLowWater && s.inboxCount <= Self.receiveResumeFrames {
                    s.readResumeScheduled = true
                    effects.resumeReading = true
                }
                return .frame(f)
            case .oversized(let n):
                // Decided now, against the limit as it is when the consumer
                // reaches this frame: the secure channel may have raised it
                // after the frames before this one.
                s.inbox.removeAll(keepingCapacity: false)
                s.head = 0
                let current = limit.load(ordering: .relaxed)
                if n <= current {
                    effects.resumeDecoder = true
                    return .wait
                }
                let e = TransportError.frameTooLarge(peer: peerDescription, size: n, limit: current)
                failLocked(&s, e)
                // `fail` (after the lock) closes the handles and wakes senders.
                effects.failure = e
                return .failed(e)
            }
        }
        switch s.readEnd {
        case .eof: return .end
        case .failed(let e): return .failed(e)
        case nil: return .wait
        }
    }

    private func perform(_ effects: Effects) {
        if let failure = effects.failure {
            fail(failure)
        }
        if effects.resumeDecoder {
            loop.execute { self.resumeDecoder() }
        }
        if effects.resumeReading {
            loop.execute { self.resumeReading() }
        }
    }

    func close() {
        let (receiver, senders, first) = state.withLock { s -> (CheckedContinuation<[UInt8]?, any Error>?, [CheckedContinuation<Void, any Error>], Bool) in
            if s.closed { return (nil, [], false) }
            s.closed = true
            s.inbox = []
            s.head = 0
            s.inboxBytes = 0
            let r = s.receiver
            s.receiver = nil
            let w = s.senders.map(\.continuation)
            s.senders = []
            return (r, w, true)
        }
        guard first else { return }
        receiver?.resume(returning: nil)
        for w in senders { w.resume(throwing: TransportError.closed(peer: peerDescription)) }
        loop.execute { self.closeGracefully() }
    }

    // MARK: Failure

    /// Ends the transport with `error`: waiting calls throw it, queued frames
    /// are dropped, the handles close.
    private func fail(_ error: any Error) {
        let (receiver, senders) = state.withLock { s -> (CheckedContinuation<[UInt8]?, any Error>?, [CheckedContinuation<Void, any Error>]) in
            failLocked(&s, error)
            // A waiting receiver has, by definition, an empty inbox.
            let r = s.receiver
            s.receiver = nil
            let w = s.senders.map(\.continuation)
            s.senders = []
            return (r, w)
        }
        if loop.inLoopThread { closeHandlesNow() } else { loop.execute { self.closeHandlesNow() } }
        receiver?.resume(throwing: error)
        for w in senders { w.resume(throwing: error) }
    }

    private func failLocked(_ s: inout State, _ error: any Error) {
        if s.failure == nil { s.failure = error }
        if s.readEnd == nil { s.readEnd = .failed(error) }
        s.outbox = []
        s.outboxSkip = 0
    }

    // MARK: Reading (loop thread)

    private func didRead(_ event: UVReadEvent) {
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

    private func endReading(_ end: ReadEnd) {
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
    private func process(_ bytes: UnsafeRawBufferPointer) -> Bool {
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

    private func directReadRegion() -> UnsafeMutableRawBufferPointer? {
        decoder.bodyRegion(minimum: Self.directReadMinimum)
    }

    /// Queues decoded frames for `receive` (and hands one to a waiting receiver).
    private func handOver(_ frames: [[UInt8]], oversized: Int?) {
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

    private func resumeReading() {
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
    private func resumeDecoder() {
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
    private func startReading() {
        guard let input, !input.isClosing else { return }
        let rc = input.startReading()
        if rc != 0 && rc != Int32(UV_EALREADY.rawValue) {
            fail(SocketError.readFailed(peer: peerDescription, UVError(rc)))
        }
    }

    // MARK: Writing (loop thread)

    private func flush() {
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

    private func writeError(_ code: Int32) -> any Error {
        if code == Int32(UV_EPIPE.rawValue) || code == Int32(UV_ECONNRESET.rawValue) {
            return TransportError.peerClosed(peer: peerDescription)
        }
        return SocketError.writeFailed(peer: peerDescription, UVError(code))
    }

    private func didWrite(bytes: Int, status: Int32) {
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
    private func closeGracefully() {
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

    private func closeHandlesNow() {
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
