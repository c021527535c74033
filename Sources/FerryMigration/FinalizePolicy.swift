// When to call Finalize. Freezing the source starts the downtime, so the
// leecher waits until what is left to send after the freeze is small: a share
// of pages held clean, or an estimated transfer time, or a deadline for
// workloads that never converge.

public struct FinalizePolicy: Sendable, Equatable {
    /// Finalize once this share (0...1) of pages is held and clean.
    public var cleanShare: Double
    /// Or once the estimated post-freeze transfer fits in this many milliseconds.
    public var maxDowntimeMilliseconds: Double?
    /// Or, whatever the state, after this many seconds of pulling.
    public var maxWaitSeconds: Double?

    public init(cleanShare: Double = 0.95, maxDowntimeMilliseconds: Double? = nil, maxWaitSeconds: Double? = nil) {
        self.cleanShare = cleanShare
        self.maxDowntimeMilliseconds = maxDowntimeMilliseconds
        self.maxWaitSeconds = maxWaitSeconds
    }

    /// Parses `95%`, `95` or `0.95`.
    public static func parsePercent(_ text: String) throws -> Double {
        let trimmed = text.hasSuffix("%") ? String(text.dropLast()) : text
        guard let value = Double(trimmed), value >= 0 else {
            throw MigrationError.badArgument("cannot read '\(text)' as a percentage: write it like 95% or 0.95")
        }
        let share = text.hasSuffix("%") || value > 1 ? value / 100 : value
        guard share <= 1 else {
            throw MigrationError.badArgument("percentage '\(text)' is above 100%")
        }
        return share
    }

    /// What the leecher knows when it asks whether to finalize.
    public struct Progress: Sendable {
        public var cleanShare: Double
        /// Pages that would have to move after the freeze (remote, dirty or in flight).
        public var pagesLeft: Int
        /// Measured pull throughput, bytes per second (0 if not yet known).
        public var bytesPerSecond: Double
        /// Pages reported dirty per second by the seeder, recently.
        public var dirtyPagesPerSecond: Double
        public var elapsedSeconds: Double
        /// True once every page has been pulled at least once and a round produced no progress.
        public var converged: Bool

        public init(cleanShare: Double, pagesLeft: Int, bytesPerSecond: Double,
                    dirtyPagesPerSecond: Double, elapsedSeconds: Double, converged: Bool) {
            self.cleanShare = cleanShare
            self.pagesLeft = pagesLeft
            self.bytesPerSecond = bytesPerSecond
            self.dirtyPagesPerSecond = dirtyPagesPerSecond
            self.elapsedSeconds = elapsedSeconds
            self.converged = converged
        }

        /// Estimated post-freeze transfer time in milliseconds.
        public var estimatedDowntimeMilliseconds: Double {
            guard bytesPerSecond > 0 else { return .infinity }
            return Double(pagesLeft) * Double(pageSize) / bytesPerSecond * 1000
        }
    }

    /// Why finalize now, or nil to keep pulling.
    public func reason(_ progress: Progress) -> String? {
        if let limit = maxWaitSeconds, progress.elapsedSeconds >= limit {
            return "waited \(limit) s (--max-wait)"
        }
        if let limit = maxDowntimeMilliseconds {
            if progress.estimatedDowntimeMilliseconds <= limit {
                return "estimated downtime fits \(limit) ms"
            }
        } else if progress.cleanShare >= cleanShare {
            return "\(Int((progress.cleanShare * 100).rounded(.down)))% of pages held clean"
        }
        if progress.converged {
            return "pre-copy converged: pulling again does not shrink the dirty set"
        }
        return nil
    }
}
