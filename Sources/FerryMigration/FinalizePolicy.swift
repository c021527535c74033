// When to call Finalize. Freezing the source is cheap (the destination can
// use the memory at once and post-copy fetches the rest), so the policy's job
// is to bound what the migration costs whatever the workload does: stop
// pre-copy as soon as more of it would not shrink the post-freeze work, and
// never let re-sending run away. Whichever rule fires first finalizes, and
// the reason names it (the leecher's `finalizing` event). The library names
// the limits neutrally; the command that set them names them its own way
// (`FinalizeReason.text(naming:)`).

public struct FinalizePolicy: Sendable, Equatable {
    /// Finalize once this share (0...1) of pages is held and clean.
    public var cleanShare: Double
    /// Or once the estimated post-freeze transfer (what post-copy would
    /// still fetch, at the measured link rate, plus a round trip) fits in
    /// this many milliseconds.
    public var maxDowntimeMilliseconds: Double
    /// Or, whatever the state, after this many seconds of pulling.
    public var maxWaitSeconds: Double?
    /// Or once pre-copy moved this multiple of the memory size:
    /// the rest goes by post-copy, so no workload makes a migration move more.
    public var maxPrecopyRatio: Double
    /// A page whose held copy went stale more than this many times is hot:
    /// pre-copy does not send it again; the final dirty set or post-copy does.
    public var hotAfter: Int

    public static let defaultMaxDowntimeMilliseconds = 100.0
    public static let defaultMaxPrecopyRatio = 1.5
    public static let defaultHotAfter = 1

    public init(cleanShare: Double = 0.95,
                maxDowntimeMilliseconds: Double = FinalizePolicy.defaultMaxDowntimeMilliseconds,
                maxWaitSeconds: Double? = nil,
                maxPrecopyRatio: Double = FinalizePolicy.defaultMaxPrecopyRatio,
                hotAfter: Int = FinalizePolicy.defaultHotAfter) {
        self.cleanShare = cleanShare
        self.maxDowntimeMilliseconds = maxDowntimeMilliseconds
        self.maxWaitSeconds = maxWaitSeconds
        self.maxPrecopyRatio = maxPrecopyRatio
        self.hotAfter = hotAfter
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

    /// Parses a multiple of the memory size: `1.5x`, `1.5`, or `inf` for no bound.
    public static func parseRatio(_ text: String) throws -> Double {
        if text == "inf" || text == "none" { return .infinity }
        let trimmed = text.hasSuffix("x") || text.hasSuffix("X") ? String(text.dropLast()) : text
        guard let value = Double(trimmed), value.isFinite, value >= 0 else {
            throw MigrationError.badArgument(
                "cannot read '\(text)' as a multiple of the memory size: write it like 1.5x, or inf for no bound")
        }
        return value
    }

    /// What the leecher knows when it asks whether to finalize.
    public struct Progress: Sendable {
        public var cleanShare: Double
        /// Pages that would have to move after the freeze (remote, dirty or in flight).
        public var pagesLeft: Int
        /// Pages pre-copy would still send: remote, or dirty and not hot.
        public var pagesPullable: Int
        /// Dirty pages left to the end because they are hot.
        public var hotPages: Int
        /// Every page was requested at least once.
        public var firstPassDone: Bool
        /// The link's measured throughput, bytes per second (0 if not yet known).
        public var bytesPerSecond: Double
        /// Pages per second whose held copies went stale, as the seeder reports.
        public var dirtyPagesPerSecond: Double
        /// A round trip to the seeder, seconds (0 if not yet known).
        public var roundTripSeconds: Double
        /// How often the leecher learns the dirty set, seconds: a page
        /// written is re-sent at best this long after.
        public var syncIntervalSeconds: Double
        /// Page bytes received so far.
        public var bytesMoved: UInt64
        /// Bytes of memory being migrated.
        public var memoryBytes: UInt64
        public var elapsedSeconds: Double
        /// True once every page has been pulled and rounds stopped shrinking the dirty set.
        public var converged: Bool

        public init(cleanShare: Double, pagesLeft: Int, pagesPullable: Int? = nil, hotPages: Int = 0,
                    firstPassDone: Bool = false, bytesPerSecond: Double, dirtyPagesPerSecond: Double,
                    roundTripSeconds: Double = 0, syncIntervalSeconds: Double = 0.2,
                    bytesMoved: UInt64 = 0, memoryBytes: UInt64 = 0,
                    elapsedSeconds: Double, converged: Bool) {
            self.cleanShare = cleanShare
            self.pagesLeft = pagesLeft
            self.pagesPullable = pagesPullable ?? pagesLeft
            self.hotPages = hotPages
            self.firstPassDone = firstPassDone
            self.bytesPerSecond = bytesPerSecond
            self.dirtyPagesPerSecond = dirtyPagesPerSecond
            self.roundTripSeconds = roundTripSeconds
            self.syncIntervalSeconds = syncIntervalSeconds
            self.bytesMoved = bytesMoved
            self.memoryBytes = memoryBytes
            self.elapsedSeconds = elapsedSeconds
            self.converged = converged
        }

        /// Estimated post-freeze transfer in milliseconds: what is left, at the
        /// link rate, plus a round trip.
        public var estimatedDowntimeMilliseconds: Double { transferMilliseconds(pages: Double(pagesLeft)) }

        func transferMilliseconds(pages: Double) -> Double {
            guard bytesPerSecond > 0 else { return .infinity }
            return (pages * Double(pageSize) / bytesPerSecond + roundTripSeconds) * 1000
        }

        /// The smallest dirty set re-sending can reach at the current rates:
        /// while a round re-sends D pages (D / link seconds) and the next
        /// report comes (one sync interval), r pages a second go stale, so
        /// D settles at r x interval / (1 - r / link); infinite once r keeps
        /// pace with the link.
        public var dirtySetFloor: Double {
            let link = bytesPerSecond / Double(pageSize)
            guard link > 0 else { return .infinity }
            let r = dirtyPagesPerSecond
            guard r < link else { return .infinity }
            return r * syncIntervalSeconds / (1 - r / link)
        }
    }

    /// Whether pre-copy has converged: once every page was pulled, the dirty
    /// sets the Sync replies leave to pull stopped shrinking for
    /// `stalledReports` reports in a row.
    public struct Convergence: Sendable {
        /// Reports without a new smallest dirty set before pre-copy counts as converged.
        public static let stalledReports = 5
        private var smallest = Int.max
        private var stalled = 0

        public init() {}

        /// A dirty report landed; `pagesToPull` pages are left to pull, and
        /// `firstPassDone` says whether every page was pulled once.
        public mutating func observe(pagesToPull: Int, firstPassDone: Bool) {
            guard firstPassDone else { return }
            if pagesToPull < smallest {
                smallest = pagesToPull
                stalled = 0
            } else {
                stalled += 1
            }
        }

        public var converged: Bool { stalled >= Self.stalledReports }
    }

    /// Why finalize now, or nil to keep pulling.
    public func reason(_ progress: Progress) -> FinalizeReason? {
        if let limit = maxWaitSeconds, progress.elapsedSeconds >= limit {
            return FinalizeReason(.maxWait) { "waited \(limit) s (\($0))" }
        }
        if progress.cleanShare >= cleanShare {
            let percent = Int((progress.cleanShare * 100).rounded(.down))
            return FinalizeReason(.cleanShare) { "\(percent)% of pages held clean (\($0))" }
        }
        let estimate = progress.estimatedDowntimeMilliseconds
        if estimate <= maxDowntimeMilliseconds {
            let limit = maxDowntimeMilliseconds
            return FinalizeReason(.maxDowntime) {
                String(format: "the post-freeze transfer, estimated at %.1f ms, fits %@ %g ms", estimate, $0, limit)
            }
        }
        if progress.firstPassDone && progress.pagesPullable == 0 && progress.hotPages > 0 {
            let hot = progress.hotPages
            return FinalizeReason(nil) { _ in "only hot pages are left (\(hot) written again after each send): post-copy takes them" }
        }
        if progress.firstPassDone && progress.bytesPerSecond > 0 {
            // More rounds cannot bring the rest within bounds: stop re-sending.
            let floor = progress.dirtySetFloor
            if progress.transferMilliseconds(pages: floor) > maxDowntimeMilliseconds {
                let staleBytes = progress.dirtyPagesPerSecond * Double(pageSize)
                let link = progress.bytesPerSecond
                let floorText = floor.isFinite ? "about \(Int(floor)) pages" : "nothing: they go stale as fast as the link resends them"
                return FinalizeReason(.maxDowntime) {
                    String(format: "pages go stale at %.0f MB/s against a link of %.0f MB/s: re-sending cannot shrink the dirty set below %@, over %@; post-copy takes the rest",
                           staleBytes / 1e6, link / 1e6, floorText, $0)
                }
            }
        }
        if progress.memoryBytes > 0, Double(progress.bytesMoved) >= maxPrecopyRatio * Double(progress.memoryBytes) {
            let moved = Double(progress.bytesMoved) / 1e6
            let ratio = maxPrecopyRatio
            return FinalizeReason(.maxPrecopy) {
                String(format: "pre-copy moved %.0f MB, %gx the memory (%@): post-copy takes the rest", moved, ratio, $0)
            }
        }
        if progress.converged {
            return FinalizeReason(nil) { _ in "pre-copy converged: pulling again does not shrink the dirty set" }
        }
        return nil
    }
}

/// Why the policy finalized: the rule that fired, and the limit it checked
/// (nil for the rules no setting controls).
public struct FinalizeReason: Sendable, CustomStringConvertible {
    /// The settings of `FinalizePolicy` a reason can name.
    public enum Limit: Sendable, Equatable {
        /// `maxWaitSeconds`.
        case maxWait
        /// `cleanShare`.
        case cleanShare
        /// `maxDowntimeMilliseconds`.
        case maxDowntime
        /// `maxPrecopyRatio`.
        case maxPrecopy

        /// How the reason names the limit when its caller does not.
        public var neutralName: String {
            switch self {
            case .maxWait: "the wait limit"
            case .cleanShare: "the clean share to finalize at"
            case .maxDowntime: "the downtime limit"
            case .maxPrecopy: "the pre-copy limit"
            }
        }
    }

    public let limit: Limit?
    private let render: @Sendable (String) -> String

    init(_ limit: Limit?, _ text: @escaping @Sendable (String) -> String) {
        self.limit = limit
        render = text
    }

    /// The reason, naming the limit as `name` says (a command names its option).
    public func text(naming name: (Limit) -> String) -> String {
        render(limit.map(name) ?? "")
    }

    public var description: String { text(naming: \.neutralName) }
}
