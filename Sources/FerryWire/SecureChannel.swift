// The secure channel: runs the handshake over any FrameTransport, then seals
// every frame as an AEAD record and is itself a FrameTransport, so the RPC
// runs over it unchanged (Protocols/wire.md § Records).
//
// Record = type (1 byte, also the AEAD's associated data) || ciphertext || tag.
// With compression negotiated (wire version 2), a data record's plaintext is
// the RPC frame or its zstd compression, then one encoding-flag byte, so the
// flag is authenticated with the rest (Compression.swift, wire.md § 5.4).
// The nonce is the direction's implicit 64-bit record counter, so a replayed,
// reordered, dropped or altered record fails authentication. Each direction
// ratchets its key (KDF) every `rekeyRecords` records or `rekeyBytes` bytes.
//
// Sealing happens on the sending task's thread and opening on the receiving
// task's, never on a transport's event-loop thread. Concurrent senders seal in
// parallel; a ticket gate hands the sealed records to the transport in
// counter order.

import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// Tuning and test hooks for a secure channel.
public struct SecureChannelOptions: Sendable {
    /// Time allowed for the whole handshake.
    public var handshakeTimeout: Duration = WireLimits.handshakeTimeout
    /// Largest payload accepted after authentication.
    public var maxIncomingPayload: Int = WireLimits.maxFrame
    /// Offer/accept AES-256-GCM when this CPU has it (false forces XChaCha20-Poly1305).
    public var allowAES: Bool = CipherSuite.aesAvailable
    /// Record compression this side offers (`--compress`); `off` offers
    /// nothing and sends a version-1 ClientHello (wire.md § 4.6, § 5.4).
    public var compression: CompressionMode = .off
    /// zstd level for compressed records.
    public var compressionLevel: Int32 = CompressionLimits.defaultLevel
    /// Names for messages ("the seeder", "the leecher").
    public var roles = HandshakeRoles()
    /// Records (of 64 KiB or more) opened in parallel ahead of `receive()`;
    /// 0 (the default) opens every record inline on the receiving task.
    /// Opt-in: a producer task hands every record to `receive()`, which costs
    /// small-request throughput (measured 363k -> 143k requests/s on 2 cores)
    /// and buys bulk throughput only when spare cores exist. For a bulk
    /// connection on a host with more than 2 cores, use `processorCount - 1`.
    public var openAhead: Int = 0
    /// Online processors, for choosing `openAhead`.
    public static var processorCount: Int { Int(sysconf(Int32(_SC_NPROCESSORS_ONLN))) }
    /// Rekey limits; both peers must use the same values (tests lower them).
    var rekeyRecords: UInt64 = WireLimits.rekeyRecords
    var rekeyBytes: UInt64 = WireLimits.rekeyBytes

    public init() {}
}

/// A record-layer failure; the channel is closed when one occurs.
public enum SecureChannelError: Error, CustomStringConvertible, Sendable, Equatable {
    /// The AEAD tag did not verify.
    case authenticationFailed(peer: String, record: UInt64)
    /// A frame too short to hold a record header and tag.
    case truncatedRecord(peer: String, record: UInt64, bytes: Int)
    /// A record type this version does not define.
    case unknownRecordType(peer: String, type: UInt8)
    /// The transport ended without the peer's authenticated close record.
    case truncatedStream(peer: String)
    /// The 64-bit record counter is exhausted (never in practice).
    case counterExhausted(peer: String)
    /// The channel was closed locally.
    case closed(peer: String)
    /// A payload over the peer-agreed limit.
    case payloadTooLarge(peer: String, size: Int, limit: Int)
    /// A compressed record that does not decompress within the limits.
    case badCompressedRecord(CompressionError)

    public var description: String {
        switch self {
        case .authenticationFailed(let peer, let n):
            return "frame failed authentication: altered, replayed or reordered (record \(n) from \(peer)); connection closed"
        case .truncatedRecord(let peer, let n, let bytes):
            return "frame failed authentication: truncated (record \(n) from \(peer) is \(bytes) bytes, shorter than a record header and tag); connection closed"
        case .unknownRecordType(let peer, let t):
            return "\(peer) sent unknown record type \(t); connection closed"
        case .truncatedStream(let peer):
            return "\(peer) closed the connection without an authenticated close record: the stream may have been truncated"
        case .counterExhausted(let peer):
            return "record counter exhausted on the connection to \(peer); reconnect"
        case .closed(let peer):
            return "secure channel to \(peer) is closed"
        case .payloadTooLarge(let peer, let size, let limit):
            return "payload of \(size) bytes for \(peer) is over the limit of \(limit) bytes"
        case .badCompressedRecord(let e):
            return e.description
        }
    }
}

/// An authenticated, encrypted FrameTransport over another FrameTransport.
public final class SecureChannel: FrameTransport {
    let transport: FrameTransport
    /// The peer's static public key (key-pair mode), nil with a pre-shared secret.
    public let peerPublicKey: PublicKey?
    /// The negotiated AEAD.
    public let cipher: CipherSuite
    /// Hash of the whole handshake transcript (channel binding, test vectors).
    let transcriptHash: [UInt8]
    private let options: SecureChannelOptions
    private let overhead: Int
    /// The negotiated record compression; when not `off`, every data record's
    /// plaintext ends with an encoding flag (wire.md § 5.4).
    public let compression: CompressionMode
    /// Decides per record whether to compress (nil when `off`).
    let governor: CompressionGovernor?

    private struct Direction {
        var key: AEADKey
        var keyBytes: [UInt8]
        var counter: UInt64 = 0
        var epochRecords: UInt64 = 0
        var epochBytes: UInt64 = 0
        var epoch: UInt64 = 0
    }
    private struct SendState {
        var dir: Direction
        var turn: UInt64 = 0
        var waiters: [UInt64: CheckedContinuation<Void, Never>] = [:]
        var failure: SecureChannelError? = nil
        var closing = false
    }
    private struct ReceiveState {
        var dir: Direction
        var failure: SecureChannelError? = nil
        var ended = false
        var busy = false
    }
    private let sendState: Mutex<SendState>
    private let receiveState: Mutex<ReceiveState>
    private let maxPayload: Atomic<Int>

    /// After a handshake (SecureChannel+Handshake.swift).
    init(transport: FrameTransport, keys: SessionKeys, options: SecureChannelOptions) throws {
        self.transport = transport
        self.peerPublicKey = keys.peerPublicKey
        self.cipher = keys.suite
        self.transcriptHash = keys.transcriptHash
        self.options = options
        self.overhead = keys.suite.overhead
        self.compression = keys.compression
        self.governor = keys.compression == .off ? nil : CompressionGovernor(mode: keys.compression, level: options.compressionLevel)
        sendState = Mutex(SendState(dir: Direction(key: try AEADKey(suite: keys.suite, key: keys.sendKey), keyBytes: keys.sendKey)))
        receiveState = Mutex(ReceiveState(dir: Direction(key: try AEADKey(suite: keys.suite, key: keys.receiveKey), keyBytes: keys.receiveKey)))
        maxPayload = Atomic(options.maxIncomingPayload)
        transport.setMaxIncomingFrameSize(options.maxIncomingPayload + 1 + overhead + (keys.compression == .off ? 0 : 1))
    }

    deinit {
        sendState.withLock { Sodium.wipe(&$0.dir.keyBytes) }
        receiveState.withLock { Sodium.wipe(&$0.dir.keyBytes) }
    }

    public var peerDescription: String { transport.peerDescription }

    // MARK: Records

    /// Advances a direction for one record of `bytes` plaintext bytes; returns the
    /// counter and the key to use. Identical on both sides, so keys never travel.
    private static func advance(_ d: inout Direction, bytes: Int, options: SecureChannelOptions) throws -> (UInt64, AEADKey) {
        if d.epochRecords >= options.rekeyRecords || d.epochBytes >= options.rekeyBytes {
            let next = try KeySchedule.ratchet(d.keyBytes)
            Sodium.wipe(&d.keyBytes)
            d.keyBytes = next
            d.key = try AEADKey(suite: d.key.suite, key: next)
            d.epochRecords = 0; d.epochBytes = 0; d.epoch += 1
        }
        let n = d.counter
        d.counter += 1
        d.epochRecords += 1
        d.epochBytes += UInt64(bytes)
        return (n, d.key)
    }

    /// Seals one record into a fresh frame: type || ciphertext || tag.
    static func sealRecord(type: UInt8, payload: [UInt8], key: AEADKey, counter: UInt64) throws -> [UInt8] {
        let total = 1 + payload.count + key.suite.overhead
        var failure: Error? = nil
        // SAFETY: the buffer holds `total` bytes; byte 0 is the type, the AEAD writes the rest.
        let frame = [UInt8](unsafeUninitializedCapacity: total) { buf, count in
            buf[0] = type
            let raw = UnsafeMutableRawBufferPointer(buf)
            withUnsafeBytes(of: type) { ad in
                payload.withUnsafeBytes { p in
                    do { try key.seal(counter: counter, ad: ad, plaintext: p, into: UnsafeMutableRawBufferPointer(rebasing: raw[1...])) }
                    catch { failure = error }
                }
            }
            count = total
        }
        if let failure { throw failure }
        return frame
    }

    public func send(_ frame: [UInt8]) async throws {
        try await sendRecord(type: WireMessageType.data.rawValue, payload: await encode(frame))
    }

    /// Sends a data record whose plaintext `encode` produced.
    func sendEncoded(_ plaintext: [UInt8]) async throws {
        try await sendRecord(type: WireMessageType.data.rawValue, payload: plaintext)
    }

    /// Turns an RPC frame into a data record's plaintext: unchanged without
    /// compression; otherwise the frame or its zstd compression, followed by
    /// the encoding flag (wire.md § 5.4). Large frames are compressed on the
    /// bulk workers. The flag is appended in place when the frame is uniquely
    /// referenced with spare capacity (RPC frames reserve it).
    func encode(_ frame: consuming [UInt8]) async -> [UInt8] {
        guard let governor else { return frame }
        var raw = consume frame
        governor.encoded(bytes: raw.count)
        guard governor.shouldCompress(bytes: raw.count) else {
            raw.append(RecordEncoding.raw.rawValue)
            return raw
        }
        let input = raw
        let level = governor.level
        let run: @Sendable () -> [UInt8]? = {
            let start = Zstd.threadCPUTime()
            let out = Zstd.shared.compress(input, level: level, suffix: RecordEncoding.zstd.rawValue)
            governor.compressed(input: input.count, output: out.map { $0.count - 1 }, elapsed: Zstd.threadCPUTime() - start)
            return out
        }
        let compressed = input.count >= BulkWorkers.minimumBytes ? await BulkWorkers.shared.run(run) : run()
        if let compressed { return compressed }
        raw = input
        raw.append(RecordEncoding.raw.rawValue)
        return raw
    }

    /// What the compressor did on this channel's sending side (nil when off).
    public var compressionStats: CompressionStats? { governor?.stats }

    /// Undoes `encode` on a received plaintext, within the payload limit.
    static func decode(_ plain: consuming [UInt8], limit: Int, peer: String) throws -> [UInt8] {
        var p = consume plain
        guard let flag = p.popLast() else { throw CompressionError.corrupt(peer: peer, reason: "record has no encoding flag") }
        switch RecordEncoding(rawValue: flag) {
        case .raw: return p
        case .zstd: return try Zstd.shared.decompress(p, limit: limit, peer: peer)
        case nil: throw CompressionError.unknownEncoding(peer: peer, flag: flag)
        }
    }

    /// A record whose counter and key are fixed but which is not yet sealed
    /// or sent. Every reserved record MUST be passed to `sendReserved`: the
    /// records after it wait for its turn.
    struct ReservedRecord: Sendable {
        let type: UInt8
        let payload: [UInt8]
        let counter: UInt64
        let key: AEADKey
    }

    /// Fixes the next record's counter and key (synchronously, so a caller that
    /// reserves several records in a row fixes their order).
    func reserve(type: UInt8 = WireMessageType.data.rawValue, payload: [UInt8]) throws -> ReservedRecord {
        let peer = peerDescription
        let (counter, key): (UInt64, AEADKey) = try sendState.withLock { s in
            if let f = s.failure { throw f }
            if s.closing && type == WireMessageType.data.rawValue { throw SecureChannelError.closed(peer: peer) }
            guard s.dir.counter < UInt64.max else { throw SecureChannelError.counterExhausted(peer: peer) }
            if type == WireMessageType.close.rawValue { s.closing = true }
            return try Self.advance(&s.dir, bytes: payload.count, options: options)
        }
        return ReservedRecord(type: type, payload: payload, counter: counter, key: key)
    }

    /// Seals a reserved record (so several callers seal on several cores;
    /// large ones on the low-priority bulk workers), then hands it to the
    /// transport in counter order.
    func sendReserved(_ r: ReservedRecord) async throws {
        let peer = peerDescription
        let counter = r.counter
        let seal: @Sendable () -> Result<[UInt8], Error> = {
            Result { try Self.sealRecord(type: r.type, payload: r.payload, key: r.key, counter: counter) }
        }
        let sealed = r.payload.count >= BulkWorkers.minimumBytes ? await BulkWorkers.shared.run(seal) : seal()
        if case .failure = sealed { failSend(SecureChannelError.closed(peer: peer)) }
        // Wait for our turn so records reach the transport in counter order.
        // A failed ticket still takes its turn; a failure wakes every waiter.
        await withCheckedContinuation { (c: CheckedContinuation<Void, Never>) in
            let now = sendState.withLock { s -> Bool in
                if s.turn == counter || s.failure != nil { return true }
                s.waiters[counter] = c
                return false
            }
            if now { c.resume() }
        }
        if case .failure(let e) = sealed { passTurn(counter); throw e }
        if let f = sendState.withLock({ $0.failure }) { passTurn(counter); throw f }
        do {
            let record = try sealed.get()
            if let governor {
                let bytes = record.count
                let start = ContinuousClock.now
                try await transport.send(record)
                governor.sent(wireBytes: bytes, elapsed: start.duration(to: .now))
            } else {
                try await transport.send(record)
            }
        } catch {
            // A record that never reached the transport leaves a gap the peer
            // cannot skip: the channel is finished.
            failSend(SecureChannelError.closed(peer: peer))
            passTurn(counter)
            transport.close()
            throw error
        }
        passTurn(counter)
    }

    private func sendRecord(type: UInt8, payload: [UInt8]) async throws {
        try await sendReserved(try reserve(type: type, payload: payload))
    }

    private func failSend(_ e: SecureChannelError) {
        let waiters = sendState.withLock { s -> [CheckedContinuation<Void, Never>] in
            if s.failure == nil { s.failure = e }
            let w = Array(s.waiters.values); s.waiters = [:]
            return w
        }
        for w in waiters { w.resume() }
    }

    private func passTurn(_ counter: UInt64) {
        let next = sendState.withLock { s -> CheckedContinuation<Void, Never>? in
            s.turn = counter + 1
            return s.waiters.removeValue(forKey: counter + 1)
        }
        next?.resume()
    }

    public func receive() async throws -> [UInt8]? {
        try receiveState.withLock { s in
            if let f = s.failure { throw f }
            if s.busy { throw WireUsageError("two concurrent receive() calls on one secure channel") }
            s.busy = true
        }
        defer { receiveState.withLock { $0.busy = false } }
        if options.openAhead > 0 { return try await receiveAhead() }
        if receiveState.withLock({ $0.ended }) { return nil }
        switch await nextRecord(deferLargeOpens: false) {
        case .ready(let r, _): return try r.get()
        case .opening(let t, let counter): return try await awaitOpen(t, counter)   // not reached inline
        }
    }

    /// One received record: opened (or failed), or being opened by a task.
    private enum Slot {
        case ready(Result<[UInt8]?, Error>, last: Bool)
        case opening(Task<Result<[UInt8], SecureChannelError>, Never>, counter: UInt64)
    }

    /// Receives and checks the next record, assigning its counter and key in
    /// order. Large records are opened by a task when `deferLargeOpens` is set.
    private func nextRecord(deferLargeOpens: Bool) async -> Slot {
        let peer = peerDescription
        let frame: [UInt8]?
        do { frame = try await transport.receive() }
        catch { receiveState.withLock { $0.ended = true }; return .ready(.failure(error), last: true) }
        guard let frame else {
            let closedLocally = sendState.withLock { $0.closing }
            receiveState.withLock { $0.ended = true }
            if closedLocally { return .ready(.success(nil), last: true) }
            return .ready(.failure(fail(.truncatedStream(peer: peer))), last: true)
        }
        let recordCount = receiveState.withLock { $0.dir.counter }
        guard frame.count >= 1 + overhead else {
            return .ready(.failure(fail(.truncatedRecord(peer: peer, record: recordCount, bytes: frame.count))), last: true)
        }
        let type = frame[0]
        guard type == WireMessageType.data.rawValue || type == WireMessageType.close.rawValue else {
            // The type is authenticated, so this is tampering or a foreign peer.
            return .ready(.failure(fail(.authenticationFailed(peer: peer, record: recordCount))), last: true)
        }
        let plainCount = frame.count - 1 - overhead
        let advanced = Result { try receiveState.withLock { s in try Self.advance(&s.dir, bytes: plainCount, options: options) } }
        guard case .success(let (counter, key)) = advanced else {
            return .ready(.failure(fail(.closed(peer: peer))), last: true)
        }
        let decodeLimit: Int? = compression == .off || type != WireMessageType.data.rawValue ? nil : maxPayload.load(ordering: .relaxed)
        if deferLargeOpens, type == WireMessageType.data.rawValue, plainCount >= Self.parallelOpenMinimum {
            return .opening(Task { await BulkWorkers.shared.run { Self.openData(frame, key: key, counter: counter, decodeLimit: decodeLimit, peer: peer) } },
                            counter: counter)
        }
        let opened = plainCount >= BulkWorkers.minimumBytes
            ? await BulkWorkers.shared.run { Self.openData(frame, key: key, counter: counter, decodeLimit: decodeLimit, peer: peer) }
            : Self.openData(frame, key: key, counter: counter, decodeLimit: decodeLimit, peer: peer)
        let plain: [UInt8]
        switch opened {
        case .success(let p): plain = p
        case .failure(let e): return .ready(.failure(fail(e)), last: true)
        }
        if type == WireMessageType.close.rawValue {
            receiveState.withLock { $0.ended = true }
            return .ready(.success(nil), last: true)
        }
        return .ready(.success(plain), last: false)
    }

    /// Opens a record and, when `decodeLimit` is set (compression negotiated,
    /// data record), undoes its encoding within that many bytes.
    static func openData(_ frame: [UInt8], key: AEADKey, counter: UInt64, decodeLimit: Int?, peer: String) -> Result<[UInt8], SecureChannelError> {
        guard let plain = openRecord(frame, key: key, counter: counter) else {
            return .failure(.authenticationFailed(peer: peer, record: counter))
        }
        guard let decodeLimit else { return .success(plain) }
        do { return .success(try decode(plain, limit: decodeLimit, peer: peer)) }
        catch let e as CompressionError { return .failure(.badCompressedRecord(e)) }
        catch { return .failure(.badCompressedRecord(.corrupt(peer: peer, reason: "\(error)"))) }
    }

    /// Opens a record (type byte || ciphertext || tag); nil when it fails authentication.
    static func openRecord(_ frame: [UInt8], key: AEADKey, counter: UInt64) -> [UInt8]? {
        let plainCount = frame.count - 1 - key.suite.overhead
        guard plainCount >= 0 else { return nil }
        var ok = false
        // SAFETY: `buf` holds plainCount bytes, exactly what the AEAD writes on success.
        let plain = [UInt8](unsafeUninitializedCapacity: plainCount) { buf, count in
            let out = UnsafeMutableRawBufferPointer(buf)
            frame.withUnsafeBytes { f in
                ok = key.open(counter: counter, ad: UnsafeRawBufferPointer(rebasing: f[0..<1]),
                              ciphertext: UnsafeRawBufferPointer(rebasing: f[1...]), into: out)
            }
            count = ok ? plainCount : 0
        }
        return ok ? plain : nil
    }

    private func awaitOpen(_ t: Task<Result<[UInt8], SecureChannelError>, Never>, _ counter: UInt64) async throws -> [UInt8]? {
        switch await t.value {
        case .success(let plain): return plain
        case .failure(let e): throw fail(e)
        }
    }

    // MARK: Open-ahead pipeline (options.openAhead > 0)
    //
    // A producer task receives records in order and starts one task per large
    // record to open it, up to `openAhead` records ahead of the consumer;
    // `receive()` takes them in order. Opening then uses as many cores as
    // there are records in flight, while counters stay strictly sequential.

    /// Records smaller than this are opened inline by the producer.
    static let parallelOpenMinimum = BulkWorkers.minimumBytes

    private struct AheadState {
        var slots: [Slot] = []
        var started = false
        var stopped = false
        var consumer: CheckedContinuation<Void, Never>? = nil
        var producer: CheckedContinuation<Void, Never>? = nil
    }
    private let ahead = Mutex(AheadState())

    private func receiveAhead() async throws -> [UInt8]? {
        let start = ahead.withLock { s -> Bool in
            if s.started { return false }
            s.started = true
            return true
        }
        if start { Task { await self.produceAhead() } }
        await withCheckedContinuation { (c: CheckedContinuation<Void, Never>) in
            let now = ahead.withLock { s -> Bool in
                if !s.slots.isEmpty || s.stopped { return true }
                s.consumer = c
                return false
            }
            if now { c.resume() }
        }
        let (slot, producer): (Slot?, CheckedContinuation<Void, Never>?) = ahead.withLock { s in
            guard !s.slots.isEmpty else { return (nil, nil) }
            let first = s.slots.removeFirst()
            let p = s.producer; s.producer = nil
            return (first, p)
        }
        producer?.resume()
        guard let slot else {
            // The producer stopped and everything was delivered: repeat the outcome.
            if let f = receiveState.withLock({ $0.failure }) { throw f }
            return nil
        }
        switch slot {
        case .ready(let r, _): return try r.get()
        case .opening(let t, let counter): return try await awaitOpen(t, counter)
        }
    }

    private func produceAhead() async {
        let depth = max(1, options.openAhead)
        while true {
            await withCheckedContinuation { (c: CheckedContinuation<Void, Never>) in
                let now = ahead.withLock { s -> Bool in
                    if s.slots.count < depth { return true }
                    s.producer = c
                    return false
                }
                if now { c.resume() }
            }
            if ahead.withLock({ $0.stopped }) { return }
            let slot = await nextRecord(deferLargeOpens: true)
            var last = false
            if case .ready(_, let l) = slot { last = l }
            let consumer = ahead.withLock { s -> CheckedContinuation<Void, Never>? in
                if s.stopped && !last { return nil }   // closed locally meanwhile: drop it
                s.slots.append(slot)
                if last { s.stopped = true }
                let c = s.consumer; s.consumer = nil
                return c
            }
            consumer?.resume()
            if last { return }
        }
    }

    private func fail(_ e: SecureChannelError) -> SecureChannelError {
        receiveState.withLock { if $0.failure == nil { $0.failure = e } }
        failSend(e)
        transport.close()
        stopAhead()
        return e
    }

    /// Stops the open-ahead producer (it may be parked waiting for space) and
    /// wakes a waiting consumer; buffered records can still be taken.
    private func stopAhead() {
        let (p, c) = ahead.withLock { s -> (CheckedContinuation<Void, Never>?, CheckedContinuation<Void, Never>?) in
            s.stopped = true
            let p = s.producer, c = s.consumer
            s.producer = nil; s.consumer = nil
            return (p, c)
        }
        p?.resume(); c?.resume()
    }

    public func setMaxIncomingFrameSize(_ bytes: Int) {
        maxPayload.store(bytes, ordering: .relaxed)
        transport.setMaxIncomingFrameSize(bytes + 1 + overhead + (compression == .off ? 0 : 1))
    }

    /// Sends the authenticated close record after every queued record, then
    /// closes the transport. Returns at once; see `closeGracefully()`.
    public func close() {
        let first = sendState.withLock { s -> Bool in
            if s.closing { return false }
            return true
        }
        guard first else { return }
        stopAhead()
        Task { await self.closeGracefully() }
        // A peer that stopped reading must not hold the connection open.
        Task { [transport] in
            try? await Task.sleep(for: SecureChannel.closeFlushTimeout)
            transport.close()
        }
    }

    /// How long `close()` waits for the close record to reach the transport.
    static let closeFlushTimeout: Duration = .seconds(2)

    /// Sends the close record (so the peer can tell a clean end from truncation),
    /// then closes the transport.
    public func closeGracefully() async {
        stopAhead()
        let alreadyFailed = sendState.withLock { $0.failure != nil }
        if !alreadyFailed {
            try? await sendRecord(type: WireMessageType.close.rawValue, payload: [])
        }
        transport.close()
    }

    // Test hooks.
    var sendEpoch: UInt64 { sendState.withLock { $0.dir.epoch } }
    var receiveEpoch: UInt64 { receiveState.withLock { $0.dir.epoch } }
}
