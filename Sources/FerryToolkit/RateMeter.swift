// A rate over a sliding window of recent samples: pages written per second
// on the seeder, bytes arriving per second on the leecher.

/// Amounts per second over the last `window`.
public struct RateMeter: Sendable {
    private var samples: [(at: ContinuousClock.Instant, amount: UInt64)] = []
    public let window: Duration

    public init(window: Duration) {
        self.window = window
    }

    /// Records `amount` (pages, bytes) as arriving now.
    public mutating func add(_ amount: UInt64, at now: ContinuousClock.Instant = .now) {
        samples.append((now, amount))
        // Keep two samples at least, so a slow trickle still has a span.
        while samples.count > 2, let first = samples.first, now - first.at > window { samples.removeFirst() }
    }

    /// The amount per second over the samples kept: everything after the
    /// first sample, divided by the time since it.
    public var perSecond: Double {
        guard let first = samples.first, let last = samples.last, last.at > first.at else { return 0 }
        let total = samples.dropFirst().reduce(UInt64(0)) { $0 &+ $1.amount }
        return Double(total) / (last.at - first.at).inSeconds
    }

    /// How long the samples kept cover.
    public var span: Duration {
        guard let first = samples.first, let last = samples.last else { return .zero }
        return last.at - first.at
    }
}
