// Duration in the units system calls and rates speak. Every conversion of a
// Duration to a number goes through here, so rounding is decided once:
// whole units truncate toward zero and saturate at the type's limits.

extension Duration {
    /// Seconds as a floating-point number, for rates and printing.
    public var inSeconds: Double {
        Double(components.seconds) + Double(components.attoseconds) / 1e18
    }

    /// Whole nanoseconds, truncated toward zero; saturates at Int64's limits.
    public var wholeNanoseconds: Int64 {
        let (product, overflow) = components.seconds.multipliedReportingOverflow(by: 1_000_000_000)
        if overflow { return components.seconds < 0 ? .min : .max }
        let (sum, overflowSum) = product.addingReportingOverflow(components.attoseconds / 1_000_000_000)
        if overflowSum { return components.seconds < 0 ? .min : .max }
        return sum
    }

    /// Whole microseconds, truncated toward zero.
    public var wholeMicroseconds: Int64 {
        let (product, overflow) = components.seconds.multipliedReportingOverflow(by: 1_000_000)
        if overflow { return components.seconds < 0 ? .min : .max }
        return product + components.attoseconds / 1_000_000_000_000
    }

    /// Whole milliseconds, truncated toward zero.
    public var wholeMilliseconds: Int64 {
        let (product, overflow) = components.seconds.multipliedReportingOverflow(by: 1_000)
        if overflow { return components.seconds < 0 ? .min : .max }
        return product + components.attoseconds / 1_000_000_000_000_000
    }

    /// Whole milliseconds clamped to `range`: for poll(2) timeouts and
    /// protocol fields narrower than 64 bits.
    public func milliseconds<T: FixedWidthInteger>(clampedTo range: ClosedRange<T>) -> T {
        let value = wholeMilliseconds
        if value <= Int64(range.lowerBound) { return range.lowerBound }
        if value >= Int64(clamping: range.upperBound) { return range.upperBound }
        return T(value)
    }
}
