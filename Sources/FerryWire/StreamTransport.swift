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
import FerryToolkit

/// Plainly Sendable: the loop thread's part is in `onLoop` (a `LoopBound`),
/// everything shared is inside `state` (a Mutex) or `limit` (an Atomic), the
/// rest is immutable. Reading, writing and closing on the loop thread are in
/// StreamTransport+Loop.swift.
final class StreamTransport: FrameTransport {

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

    /// What only the loop thread touches: the handles and the decoder.
    struct OnLoop {
        var input: UVStream?
        var output: UVStream?
        var decoder: FrameDecoder
        var stash: [UInt8] = []                // bytes after a header that stopped the decoder
        var lingerTimer: UVTimer?
    }
    let onLoop: LoopBound<OnLoop>

    // Loop thread.
    var input: UVStream? {
        get { onLoop.value.input }
        set { onLoop.value.input = newValue }
    }
    var output: UVStream? {
        get { onLoop.value.output }
        set { onLoop.value.output = newValue }
    }
    var decoder: FrameDecoder {
        _read { yield onLoop.value.decoder }
        _modify { yield &onLoop.value.decoder }
    }
    var stash: [UInt8] {
        _read { yield onLoop.value.stash }
        _modify { yield &onLoop.value.stash }
    }
    var lingerTimer: UVTimer? {
        get { onLoop.value.lingerTimer }
        set { onLoop.value.lingerTimer = newValue }
    }

    enum Item { case frame([UInt8]); case oversized(Int) }
    enum DeferredClose { case graceful, now }
    enum ReadEnd { case eof; case failed(any Error) }

    struct State {
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
    let state = Mutex(State())
    let limit: Atomic<Int>

    struct Effects {
        var resumeReading = false
        var resumeDecoder = false
        var failure: (any Error)? = nil
    }

    enum Next {
        case frame([UInt8]), end, failed(any Error), wait
    }

    /// A transport whose handles are attached later by `attach` (on the loop thread).
    init(loop: EventLoop, peer: String) {
        self.loop = loop
        self.peerDescription = peer
        self.onLoop = LoopBound(OnLoop(decoder: FrameDecoder(maxFrameSize: Self.defaultMaxIncomingFrameSize)), on: loop)
        self.limit = Atomic(Self.defaultMaxIncomingFrameSize)
    }

    deinit {
        // Dropped without close(): close the handles so descriptors do not leak.
        let onLoop = self.onLoop
        loop.execute {
            let handles = onLoop.value
            handles.input?.close()
            handles.output?.close()
            handles.lingerTimer?.close()
        }
    }

    // MARK: Setting up (loop thread)

    /// Attaches the stream(s) and starts reading. `input` and `output` may be
    /// the same handle (sockets) or two (standard input and output).
    func attach(input: UVStream, output: UVStream) {
        assert(loop.inLoopThread, "handles are attached on the loop thread")
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

    func writeDirectly(_ frame: [UInt8], to fd: Int32) -> (any Error)? {
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
                    do {
                        let result = try systemCall("sendmsg", on: peerDescription) {
                            sendmsg(fd, &message, Int32(MSG_NOSIGNAL) | Int32(MSG_DONTWAIT))
                        }
                        if case .done(let n) = result { written = n }
                    } catch let failure as SystemError {
                        error = failure.errno
                    } catch {}
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
    func waitForRoom() async throws {
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

    static func resume(_ c: CheckedContinuation<[UInt8]?, any Error>, with next: Next) {
        switch next {
        case .frame(let f): c.resume(returning: f)
        case .end: c.resume(returning: nil)
        case .failed(let e): c.resume(throwing: e)
        case .wait: break
        }
    }

    /// Takes the next thing `receive` should return, with the state locked.
    func nextLocked(_ s: inout State, _ effects: inout Effects) -> Next {
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

    func perform(_ effects: Effects) {
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
    func fail(_ error: any Error) {
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

    func failLocked(_ s: inout State, _ error: any Error) {
        if s.failure == nil { s.failure = error }
        if s.readEnd == nil { s.readEnd = .failed(error) }
        s.outbox = []
        s.outboxSkip = 0
    }
}
