// A bandwidth cap (issue 14): a token bucket on the monotonic clock, shared
// by every connection of a process, that bulk transfer waits on and urgent
// transfer only charges. The seeder and the hub pass each bulk ReadAt part
// through it before sending; the leecher passes each bulk request, sized in
// the bytes it asks for. A post-copy touch (a page a program is blocked on)
// never waits: its bytes are charged, so bulk transfer gives them way and
// the total stays at the cap.
//
// The bucket keeps two cumulative counters instead of a token count:
// `reserved`, the bytes bulk callers have asked to send, and `released`, the
// bytes the rate has let through so far (it grows at the rate, never more
// than a burst past `reserved` when idle, and shrinks by what urgent
// transfer sends). A bulk caller takes a ticket (its `reserved` after adding
// its bytes) and goes when `released` reaches it, so callers go in arrival
// order. Waiters re-check at least every `maxSleep`, so a cap changed while
// a migration runs takes effect within that, in both directions.
import Synchronization
import FerryToolkit

/// A bandwidth cap in bytes per second, parsed from `200M`, `1G`, `1.5GiB/s`.
public struct BandwidthRate: Sendable, Equatable, CustomStringConvertible {
    public let bytesPerSecond: Double

    /// Rates below this are refused: a typo (`--max-bandwidth 1` for 1 byte/s)
    /// would stall a migration for hours rather than fail it.
    public static let minimum: Double = 1000
    /// Above 1 PB/s no link exists; larger values are typos or overflow.
    public static let maximum: Double = 1e15

    public init(bytesPerSecond: Double) throws {
        guard bytesPerSecond.isFinite, bytesPerSecond >= Self.minimum, bytesPerSecond <= Self.maximum else {
            throw BandwidthRateError.outOfRange("\(bytesPerSecond)")
        }
        self.bytesPerSecond = bytesPerSecond
    }

    /// Parses RATE: a number of bytes per second with an optional unit,
    /// decimal `K`, `M`, `G`, `T` (also `KB`, `MB`...) or binary `KiB`, `MiB`,
    /// `GiB`, `TiB`, and an optional `/s`. Case-insensitive; `200M` and
    /// `200MB/s` are 200,000,000 bytes per second, `1GiB` is 1,073,741,824.
    public init(parsing text: String) throws {
        let trimmed = text.trimmingWhitespace()
        var body = Substring(trimmed.lowercased())
        if body.hasSuffix("/s") { body = body.dropLast(2) }
        else if body.hasSuffix("ps") && body.count > 2 { body = body.dropLast(2) } // 200MBps
        let units: [(String, Double)] = [
            ("kib", 1024), ("mib", 1_048_576), ("gib", 1_073_741_824), ("tib", 1_099_511_627_776),
            ("kb", 1e3), ("mb", 1e6), ("gb", 1e9), ("tb", 1e12),
            ("k", 1e3), ("m", 1e6), ("g", 1e9), ("t", 1e12), ("b", 1),
        ]
        var multiplier: Double = 1
        for (suffix, value) in units where body.hasSuffix(suffix) {
            multiplier = value
            body = body.dropLast(suffix.count)
            break
        }
        let number = body.trimmingWhitespace()
        // Digits and one dot only: no sign, exponent, "inf" or "nan".
        guard !number.isEmpty, number.allSatisfy({ $0.isASCII && ($0.isNumber || $0 == ".") }),
              number.filter({ $0 == "." }).count <= 1, number != ".", let value = Double(number) else {
            if trimmed.hasPrefix("-") { throw BandwidthRateError.negative(trimmed) }
            throw BandwidthRateError.garbage(trimmed)
        }
        guard value > 0 else { throw BandwidthRateError.zero(trimmed) }
        let rate = value * multiplier
        guard rate >= Self.minimum else { throw BandwidthRateError.tooSmall(trimmed) }
        guard rate <= Self.maximum else { throw BandwidthRateError.outOfRange(trimmed) }
        bytesPerSecond = rate
    }

    /// `200 MB/s`, `1.5 GB/s`, `800 kB/s` (decimal, as the events print rates).
    public var description: String {
        let value = bytesPerSecond
        if value >= 1e9 { return Self.trimmed(value / 1e9) + " GB/s" }
        if value >= 1e6 { return Self.trimmed(value / 1e6) + " MB/s" }
        return Self.trimmed(value / 1e3) + " kB/s"
    }

    private static func trimmed(_ value: Double) -> String {
        let rounded = (value * 100).rounded() / 100
        return rounded == rounded.rounded() ? String(Int(rounded)) : String(rounded)
    }
}

/// Why a RATE was refused; each message says what is accepted.
public enum BandwidthRateError: Error, Equatable, CustomStringConvertible {
    /// Zero would stop the transfer for good.
    case zero(String)
    case negative(String)
    case garbage(String)
    /// Below `BandwidthRate.minimum`.
    case tooSmall(String)
    case outOfRange(String)

    static let accepted = "a number of bytes per second with an optional unit: K, M, G (decimal: 200M is 200,000,000 bytes/s) or KiB, MiB, GiB (binary), e.g. 50M, 200MB/s, 1G, 1.5GiB"

    public var description: String {
        switch self {
        case .zero(let text): "a bandwidth cap of '\(text)' would stop the transfer; give a positive rate (\(Self.accepted)), or leave the option out for no cap"
        case .negative(let text): "a bandwidth cap cannot be negative: '\(text)'; give \(Self.accepted)"
        case .garbage(let text): "cannot read '\(text)' as a rate; give \(Self.accepted)"
        case .tooSmall(let text): "a bandwidth cap of '\(text)' is below the smallest accepted, 1K (1000 bytes/s)"
        case .outOfRange(let text): "a bandwidth cap of '\(text)' is beyond any link (at most 1000T); give \(Self.accepted)"
        }
    }
}

extension StringProtocol {
    fileprivate func trimmingWhitespace() -> String {
        var s = Substring(self)
        while let first = s.first, first.isWhitespace { s = s.dropFirst() }
        while let last = s.last, last.isWhitespace { s = s.dropLast() }
        return String(s)
    }
}

/// A token bucket shared by the connections of a process. Thread-safe;
/// callers may be on any task or thread.
public final class Pacer: Sendable {
    /// The clock the bucket reads, in seconds; injected by tests.
    public typealias Clock = @Sendable () -> Double

    /// Burst: what may go at once after an idle spell. 20 ms of the rate,
    /// at least 256 KiB (a quarter of a part: the sender does not wake per
    /// page) and at most 8 MiB. A sender held up for less than 20 ms (a
    /// busy core) catches up instead of losing that time for good, and
    /// over a second the rate stays within 2 % of the cap.
    static func burst(for rate: Double) -> Double {
        min(Double(8 << 20), max(Double(256 << 10), rate * 0.02))
    }
    /// Longest single sleep of a waiting caller: a cap raised while it
    /// waits reaches it within this.
    static let maxSleep = 0.1

    private struct State {
        var rate: Double?
        var reserved: Double = 0
        var released: Double = 0
        var last: Double
        /// Bytes sent through the pacer, bulk and urgent.
        var bulkBytes: UInt64 = 0
        var urgentBytes: UInt64 = 0

        /// Lets the rate through for the time since `last`: up to a burst
        /// past `reserved` (idle credit is bounded).
        mutating func refill(now: Double) {
            defer { last = now }
            guard let rate else {
                released = reserved
                return
            }
            let ceiling = reserved + Pacer.burst(for: rate)
            if released < ceiling {
                released = min(ceiling, released + max(0, now - last) * rate)
            }
        }
    }

    private let state: Mutex<State>
    private let clock: Clock

    /// `rate` nil: no cap (every call passes at once, bytes are still counted).
    public init(rate: BandwidthRate?, clock: @escaping Clock = Pacer.monotonicSeconds) {
        self.clock = clock
        let now = clock()
        var initial = State(rate: rate?.bytesPerSecond, last: now)
        // Start with a burst of credit, as after an idle spell.
        if let r = rate?.bytesPerSecond { initial.released = Pacer.burst(for: r) }
        state = Mutex(initial)
    }

    /// The cap in effect; nil when there is none.
    public var rate: BandwidthRate? {
        state.withLock { s in s.rate.flatMap { try? BandwidthRate(bytesPerSecond: $0) } }
    }

    /// Changes the cap (nil: none) for what is waiting and what comes.
    public func setRate(_ rate: BandwidthRate?) {
        let now = clock()
        state.withLock { s in
            s.refill(now: now)
            s.rate = rate?.bytesPerSecond
            if let r = s.rate {
                // Debt carries over (it is bytes already sent); credit past a
                // burst of the new rate does not.
                s.released = min(s.released, s.reserved + Pacer.burst(for: r))
            }
        }
    }

    /// Bytes counted so far: (bulk, urgent).
    public var bytesCounted: (bulk: UInt64, urgent: UInt64) {
        state.withLock { ($0.bulkBytes, $0.urgentBytes) }
    }

    /// Urgent bytes (a page a program waits for): never waits, but charged,
    /// so bulk transfer behind it waits that much longer.
    public func charge(_ bytes: Int) {
        guard bytes > 0 else { return }
        let now = clock()
        state.withLock { s in
            s.refill(now: now)
            s.urgentBytes += UInt64(bytes)
            if s.rate != nil { s.released -= Double(bytes) }
        }
    }

    /// Gives back bulk bytes charged but not sent (the leecher asks for
    /// pages by the byte; all-zero pages come back as runs without bytes).
    public func refund(_ bytes: Int) {
        guard bytes > 0 else { return }
        let now = clock()
        state.withLock { s in
            s.refill(now: now)
            s.bulkBytes -= min(s.bulkBytes, UInt64(bytes))
            if s.rate != nil { s.released += Double(bytes) }
        }
    }

    /// Bulk bytes if the bucket has credit now (and no one waits before
    /// them): takes them, running into debt if they are more than the
    /// credit, and returns true; otherwise takes nothing.
    public func tryPass(_ bytes: Int) -> Bool {
        let now = clock()
        return state.withLock { s in
            s.refill(now: now)
            guard s.rate != nil else {
                s.bulkBytes += UInt64(max(0, bytes))
                return true
            }
            guard s.released > s.reserved else { return false }
            s.reserved += Double(bytes)
            s.bulkBytes += UInt64(max(0, bytes))
            return true
        }
    }

    /// Bulk bytes: waits, in arrival order with other bulk callers, until
    /// the cap lets them through. Throws CancellationError if the task is
    /// cancelled while it waits (the bytes stay charged: they are few and
    /// the connection is going away).
    public func pace(_ bytes: Int) async throws {
        guard bytes > 0 else { return }
        let now = clock()
        let ticket = state.withLock { s -> Double? in
            s.refill(now: now)
            s.bulkBytes += UInt64(bytes)
            guard s.rate != nil else { return nil }
            s.reserved += Double(bytes)
            return s.released >= s.reserved ? nil : s.reserved
        }
        guard let ticket else { return }
        while true {
            let wait = state.withLock { s -> Double? in
                s.refill(now: clock())
                guard let rate = s.rate, s.released < ticket else { return nil }
                return (ticket - s.released) / rate
            }
            guard let wait else { return }
            let slice = min(wait, Self.maxSleep)
            try await Task.sleep(for: .nanoseconds(max(Int64(slice * 1e9), 50_000)))
        }
    }

    /// Seconds on the monotonic clock (CLOCK_MONOTONIC via ContinuousClock).
    public static let monotonicSeconds: Clock = {
        let origin = ContinuousClock.now
        return {
            let elapsed = ContinuousClock.now - origin
            return elapsed.inSeconds
        }
    }()
}
