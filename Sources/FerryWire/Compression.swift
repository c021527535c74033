// Record compression for slow links (Protocols/wire.md § 5.4, issue 14).
//
// Why: a process's heap is often half text, pointers and padding, and a WAN
// link at 100 MB/s moves it at a third of the speed zstd can shrink it. Each
// data record's plaintext may be compressed with zstd (Debian's libzstd-dev,
// 1.5.4) *before* it is sealed: the record then starts with a flag byte,
// inside the AEAD, saying whether the rest is raw or one zstd frame. A
// compressed frame that is not smaller than the input is never sent.
//
// Compress-then-encrypt leaks the compressed length (CRIME/BREACH): see the
// user guide's "Compression" section. That is why `--compress` defaults to
// `off`, and why a peer that says `off` wins the negotiation.
//
// Decompression is bounded: a frame must declare its content size, which
// must not exceed the receiver's payload limit, and is decoded in one shot
// into a buffer of exactly that size, so a decompression bomb costs at most
// one record's worth of memory and ends the connection with a clear error.

internal import CZstd
import Synchronization
import FerryToolkit
#if canImport(Glibc)
import Glibc
#endif

/// What a side of a connection is willing to do (`--compress`).
public enum CompressionMode: String, Sendable, CaseIterable, CustomStringConvertible {
    /// Never compress, and do not offer compression in the handshake.
    case off
    /// Compress only while the link is slower than the compressor (measured).
    case auto
    /// Compress every record that shrinks.
    case zstd

    /// Wire value in ClientHello and ServerHello (wire.md § 7.7).
    var wireValue: UInt8 {
        switch self {
        case .off: return 0
        case .auto: return 1
        case .zstd: return 2
        }
    }

    init?(wireValue: UInt8) {
        switch wireValue {
        case 0: self = .off
        case 1: self = .auto
        case 2: self = .zstd
        default: return nil
        }
    }

    public var description: String { rawValue }

    /// The negotiated mode of two peers: `off` if either says off; `zstd` if
    /// either insists on it; `auto` otherwise. Symmetric, so the result does
    /// not depend on which side is the server.
    public static func negotiate(_ a: CompressionMode, _ b: CompressionMode) -> CompressionMode {
        if a == .off || b == .off { return .off }
        if a == .zstd || b == .zstd { return .zstd }
        return .auto
    }
}

/// Compression algorithm ids (wire.md § 7.7).
enum CompressionAlgorithm: UInt8, Sendable {
    case zstd = 1
}

/// The flag byte that starts a data record's plaintext once compression is
/// negotiated (wire.md § 5.4).
enum RecordEncoding: UInt8 {
    case raw = 0
    case zstd = 1
}

/// Tuning constants, with the reason beside each.
public enum CompressionLimits {
    /// zstd level 1: ~300-500 MB/s per core on our machines, ratio close to
    /// level 3 on heap pages. Faster levels lose ratio for little speed.
    public static let defaultLevel: Int32 = 1
    /// Records below this are sent raw: requests and small replies gain
    /// nothing worth the call.
    static let minimumBytes = 512
    /// `auto` starts compressing when the link drains slower than this share
    /// of the compressor's input rate (so the compressor is never the
    /// bottleneck)...
    static let linkShare = 0.5
    /// ...and stops only once the link is as fast as the compressor itself:
    /// a wide band keeps `auto` from flapping while the link rate swings.
    static let linkShareToStop = 1.0
    /// ...and only while compressing saves at least this share of the bytes.
    static let minimumSaving = 0.08
    /// `auto` re-evaluates its decision on windows of this length (10 MB at
    /// 100 MB/s: enough to measure a rate, short enough to switch on early).
    static let window: Duration = .milliseconds(100)
    /// While not compressing, `auto` compresses one record in this interval
    /// to keep its compressor rate and ratio current.
    static let probeInterval: Duration = .seconds(1)
    /// After this many windows of compressing, `auto` checks that frames now
    /// go out at least `trialGain` x faster than they did uncompressed, and
    /// otherwise stops for `holdOff` (see `CompressionGovernor`).
    static let trialWindows = 3
    static let trialGain = 1.1
    static let holdOff: Duration = .seconds(5)
    /// A send that waits longer than this found the transport's queue full:
    /// the link, not the producer, sets the pace.
    static let blockedThreshold: Duration = .microseconds(200)
}

/// A record that failed to decompress; the connection is closed.
public enum CompressionError: Error, CustomStringConvertible, Sendable, Equatable {
    /// The frame declares no content size, or one over the payload limit (a bomb).
    case tooLarge(peer: String, declared: UInt64?, limit: Int)
    /// zstd could not decode the frame, or it decoded to another size.
    case corrupt(peer: String, reason: String)
    /// A flag value this version does not define.
    case unknownEncoding(peer: String, flag: UInt8)

    public var description: String {
        switch self {
        case .tooLarge(let peer, let declared, let limit):
            let what = declared.map { "declares \($0) bytes" } ?? "does not declare its decompressed size"
            return "compressed record from \(peer) \(what), over the limit of \(limit) bytes (a decompression bomb?); connection closed"
        case .corrupt(let peer, let reason):
            return "compressed record from \(peer) is corrupt: \(reason); connection closed"
        case .unknownEncoding(let peer, let flag):
            return "record from \(peer) has unknown encoding flag \(flag); connection closed"
        }
    }
}

/// zstd one-shot compression and bounded decompression.
///
/// The context pools live in a `Mutex`; a context taken out is used by one
/// thread at a time.
final class Zstd: Sendable {
    static let shared = Zstd()

    /// Contexts kept for reuse (one per concurrent compressor; BulkWorkers
    /// run one per core, so a handful).
    private let cctxs = Mutex<[UnsafeContext]>([])
    private let dctxs = Mutex<[UnsafeContext]>([])
    private static let poolLimit = 16

    /// A zstd context, owned by the pool or by one caller at a time. Kept as
    /// its address, so the pools hold plain data.
    private struct UnsafeContext: Sendable {
        private let address: UInt
        init(pointer: OpaquePointer?) { address = UInt(bitPattern: pointer) }
        var pointer: OpaquePointer { OpaquePointer(bitPattern: address)! }
    }

    /// Compresses `input` at `level` into `frame || suffix`; nil when the
    /// frame would not be smaller than the input.
    func compress(_ input: [UInt8], level: Int32, suffix: UInt8) -> [UInt8]? {
        let ctx = cctxs.withLock { $0.popLast() } ?? UnsafeContext(pointer: ZSTD_createCCtx())
        defer { cctxs.withLock { if $0.count < Self.poolLimit { $0.append(ctx) } else { ZSTD_freeCCtx(ctx.pointer) } } }
        let capacity = input.count   // anything not smaller is useless
        var produced = 0
        // SAFETY: the buffer has capacity + 1 bytes; zstd writes at most
        // `capacity` and reports an error when it runs out; the suffix follows.
        let out = [UInt8](unsafeUninitializedCapacity: capacity + 1) { buf, count in
            let r = input.withUnsafeBytes { src in
                ZSTD_compressCCtx(ctx.pointer, buf.baseAddress, capacity, src.baseAddress, src.count, level)
            }
            if ZSTD_isError(r) != 0 || r >= capacity { count = 0; return }
            produced = r
            buf[r] = suffix
            count = r + 1
        }
        guard produced > 0 else { return nil }
        return out
    }

    /// CPU time of the calling thread: the compressor's rate is measured in
    /// it, so that it says how fast zstd runs on this data, not how busy the
    /// host was (bulk workers run at nice +10 and wait behind everything).
    static func threadCPUTime() -> Duration {
        var ts = timespec()
        clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts)
        return .seconds(ts.tv_sec) + .nanoseconds(ts.tv_nsec)
    }

    /// Decompresses exactly one zstd frame, refusing anything that declares
    /// more than `limit` bytes (or does not declare its size).
    func decompress(_ frame: [UInt8], limit: Int, peer: String) throws -> [UInt8] {
        try frame.withUnsafeBytes { body in
            let declared = ZSTD_getFrameContentSize(body.baseAddress, body.count)
            if declared == UInt64.max - 1 {   // ZSTD_CONTENTSIZE_ERROR
                throw CompressionError.corrupt(peer: peer, reason: "not a zstd frame")
            }
            guard declared != UInt64.max, declared <= UInt64(limit) else {   // ZSTD_CONTENTSIZE_UNKNOWN or a bomb
                throw CompressionError.tooLarge(peer: peer, declared: declared == UInt64.max ? nil : declared, limit: limit)
            }
            let frameSize = ZSTD_findFrameCompressedSize(body.baseAddress, body.count)
            guard ZSTD_isError(frameSize) == 0, frameSize == body.count else {
                throw CompressionError.corrupt(peer: peer, reason: "the record holds more or less than one zstd frame")
            }
            let size = Int(declared)
            let ctx = dctxs.withLock { $0.popLast() } ?? UnsafeContext(pointer: ZSTD_createDCtx())
            defer { dctxs.withLock { if $0.count < Self.poolLimit { $0.append(ctx) } else { ZSTD_freeDCtx(ctx.pointer) } } }
            var failure: String? = nil
            // SAFETY: zstd writes at most `size` bytes into the buffer (one
            // shot, bounded output) and we keep only what it reports.
            let out = [UInt8](unsafeUninitializedCapacity: size) { buf, count in
                let r = ZSTD_decompressDCtx(ctx.pointer, buf.baseAddress, size, body.baseAddress, body.count)
                if ZSTD_isError(r) != 0 {
                    failure = String(cString: ZSTD_getErrorName(r)); count = 0
                } else if r != size {
                    failure = "decoded to \(r) bytes where the frame declares \(size)"; count = 0
                } else {
                    count = r
                }
            }
            if let failure { throw CompressionError.corrupt(peer: peer, reason: failure) }
            return out
        }
    }
}

/// Decides, per record, whether `auto` compresses: compress while the link
/// drains slower than `linkShare` x the compressor's input rate and the
/// data shrinks by at least `minimumSaving`. Measured, never configured:
///
/// - link rate: bytes handed to the transport per second over a window in
///   which sends found the queue full (the link set the pace); windows in
///   which the producer set the pace only raise the estimate.
/// - compressor rate and ratio: input bytes per CPU second of every
///   compressed record (and, while not compressing, of one probe record a
///   second), so a busy host does not make zstd look slow.
///
/// Starts uncompressed, so a fast link is never slowed while it is measured.
/// Then it checks its own decision: after `trialWindows` windows of
/// compressing, the frame bytes (before compression) sent per second must
/// beat the link rate it measured uncompressed by `trialGain`, or it stops
/// and stays off for `holdOff`. (A receiver starved of CPU on a busy host
/// drains the queue as slowly as a slow link does; compressing does not help
/// there, and this is how `auto` finds out.)
/// Thread-safe: one `Mutex` holds the estimates.
final class CompressionGovernor: Sendable {
    let mode: CompressionMode
    let level: Int32

    private struct State {
        var compressing = false
        var linkRate: Double? = nil          // bytes/s, when the link set the pace
        var compressRate: Double? = nil      // input bytes/s of one compressor
        var saving: Double? = nil            // 1 - output/input, smoothed
        var windowStart: ContinuousClock.Instant
        var windowBytes = 0
        var windowBlocked: Duration = .zero
        var lastProbe: ContinuousClock.Instant? = nil
        var windowInput = 0                  // frame bytes before compression, this window
        var rateWhenOff: Double? = nil       // the link rate when compression was switched on
        var trialRate: Double? = nil         // frame bytes/s since, smoothed
        var trialWindows = 0
        var holdOffUntil: ContinuousClock.Instant? = nil
        var stats = CompressionStats()
    }
    private let state: Mutex<State>

    init(mode: CompressionMode, level: Int32 = CompressionLimits.defaultLevel) {
        self.mode = mode
        self.level = level
        state = Mutex(State(windowStart: .now))
    }

    /// Whether to compress a record of `bytes` plaintext bytes now.
    func shouldCompress(bytes: Int) -> Bool {
        guard bytes >= CompressionLimits.minimumBytes else { return false }
        switch mode {
        case .off: return false
        case .zstd: return true
        case .auto:
            return state.withLock { s in
                if s.compressing { return true }
                // Probe now and then, so the compressor's figures stay current.
                let now = ContinuousClock.now
                if bytes >= 16 << 10, s.lastProbe.map({ $0.duration(to: now) >= CompressionLimits.probeInterval }) ?? true {
                    s.lastProbe = now
                    return true
                }
                return false
            }
        }
    }

    /// Records one frame of `bytes` bytes (before compression) on its way to
    /// the transport, compressed or not.
    func encoded(bytes: Int) {
        guard mode == .auto else { return }
        state.withLock { $0.windowInput += bytes }
    }

    /// Records one compression attempt: input size, output size (nil when
    /// it did not shrink) and the time it took.
    func compressed(input: Int, output: Int?, elapsed: Duration) {
        let seconds = max(elapsed.inSeconds, 1e-7)
        state.withLock { s in
            let rate = Double(input) / seconds
            s.compressRate = s.compressRate.map { 0.8 * $0 + 0.2 * rate } ?? rate
            let saving = 1 - Double(output ?? input) / Double(input)
            s.saving = s.saving.map { 0.7 * $0 + 0.3 * saving } ?? saving
            s.stats.attempts += 1
            s.stats.inputBytes += input
            s.stats.outputBytes += output ?? input
            if output != nil { s.stats.compressedRecords += 1 }
        }
    }

    /// Records one record handed to the transport: its size on the wire and
    /// how long the send took (long sends mean the queue was full).
    func sent(wireBytes: Int, elapsed: Duration) {
        guard mode == .auto else {
            state.withLock { $0.stats.wireBytes += wireBytes }
            return
        }
        state.withLock { s in
            s.stats.wireBytes += wireBytes
            let now = ContinuousClock.now
            // A window starts with its first record: idle time before it
            // (the handshake, Track, a pause between requests) says nothing of the link.
            if s.windowBytes == 0 { s.windowStart = now - elapsed }
            s.windowBytes += wireBytes
            if elapsed >= CompressionLimits.blockedThreshold { s.windowBlocked += elapsed }
            let span = s.windowStart.duration(to: now)
            guard span >= CompressionLimits.window else { return }
            let rate = Double(s.windowBytes) / span.inSeconds
            if s.windowBlocked >= span / 4 {
                // The link set the pace for a good part of the window.
                s.linkRate = s.linkRate.map { 0.5 * $0 + 0.5 * rate } ?? rate
            } else if let l = s.linkRate, rate > l {
                s.linkRate = rate   // the link is at least this fast
            }
            let inputRate = Double(s.windowInput) / span.inSeconds
            s.windowStart = now; s.windowBytes = 0; s.windowBlocked = .zero; s.windowInput = 0
            if s.compressing {
                s.trialWindows += 1
                s.trialRate = s.trialRate.map { 0.5 * $0 + 0.5 * inputRate } ?? inputRate
                if s.trialWindows >= CompressionLimits.trialWindows, let before = s.rateWhenOff, let after = s.trialRate,
                   after < CompressionLimits.trialGain * before {
                    // Compressing did not move more data than not compressing did.
                    s.compressing = false
                    s.holdOffUntil = now + CompressionLimits.holdOff
                    s.stats.autoTrialsFailed += 1
                } else {
                    s.compressing = Self.decide(s)
                }
            } else if s.holdOffUntil.map({ now < $0 }) ?? false {
                s.compressing = false
            } else {
                s.compressing = Self.decide(s)
                if s.compressing {
                    s.rateWhenOff = s.linkRate
                    s.trialRate = nil
                    s.trialWindows = 0
                }
            }
            if s.compressing { s.stats.autoOnWindows += 1 } else { s.stats.autoOffWindows += 1 }
        }
    }

    private static func decide(_ s: State) -> Bool {
        guard let link = s.linkRate, let c = s.compressRate, let saving = s.saving else { return false }
        // Hysteresis: once on, stay on until the link is as fast as the compressor.
        let share = s.compressing ? CompressionLimits.linkShareToStop : CompressionLimits.linkShare
        return link < share * c && saving >= CompressionLimits.minimumSaving
    }

    var stats: CompressionStats { state.withLock { $0.stats } }
}

/// What a channel's compressor did, for benchmarks and `--json` reports.
public struct CompressionStats: Sendable, Equatable {
    /// Records the compressor ran on, and those sent compressed.
    public var attempts = 0
    public var compressedRecords = 0
    /// Bytes in and out of the compressor (raw size when it did not shrink).
    public var inputBytes = 0
    public var outputBytes = 0
    /// Record bytes handed to the transport (sealed, with headers).
    public var wireBytes = 0
    /// `auto` windows that decided to compress, and not to.
    public var autoOnWindows = 0
    public var autoOffWindows = 0
    /// Times `auto` switched compression off because it did not speed frames up.
    public var autoTrialsFailed = 0
}
