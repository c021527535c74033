import Testing
import FerryToolkit

@Suite struct DurationsTests {
    @Test func wholeUnitsTruncateTowardZero() {
        let d = Duration.seconds(2) + .nanoseconds(999_999_999)
        #expect(d.wholeMilliseconds == 2_999)
        #expect(d.wholeMicroseconds == 2_999_999)
        #expect(d.wholeNanoseconds == 2_999_999_999)
        #expect(d.inSeconds == 2.999999999)
    }

    @Test func subUnitDurationsAreZeroWholeUnits() {
        #expect(Duration.microseconds(999).wholeMilliseconds == 0)
        #expect(Duration.nanoseconds(999).wholeMicroseconds == 0)
        #expect(Duration.nanoseconds(1).wholeNanoseconds == 1)
        #expect(Duration.zero.inSeconds == 0)
    }

    @Test func negativeDurations() {
        let d = Duration.zero - .milliseconds(1_500)
        #expect(d.wholeMilliseconds == -1_500)
        #expect(d.wholeMicroseconds == -1_500_000)
        #expect(d.wholeNanoseconds == -1_500_000_000)
        #expect(d.inSeconds == -1.5)
        #expect((Duration.zero - .microseconds(1)).wholeMilliseconds == 0)
    }

    @Test func saturatesAtTheLimits() {
        let huge = Duration.seconds(Int64.max)
        #expect(huge.wholeNanoseconds == .max)
        #expect(huge.wholeMicroseconds == .max)
        #expect(huge.wholeMilliseconds == .max)
        let tiny = Duration.seconds(Int64.min)
        #expect(tiny.wholeNanoseconds == .min)
        #expect(tiny.wholeMilliseconds == .min)
    }

    @Test func clampedMilliseconds() {
        #expect(Duration.seconds(10).milliseconds(clampedTo: Int32(1)...50) == 50)
        #expect(Duration.zero.milliseconds(clampedTo: Int32(1)...50) == 1)
        #expect(Duration.milliseconds(7).milliseconds(clampedTo: Int32(1)...50) == 7)
        #expect(Duration.seconds(Int64.max).milliseconds(clampedTo: Int32.min...Int32.max) == .max)
        #expect((Duration.zero - .seconds(5)).milliseconds(clampedTo: UInt16.min...UInt16.max) == 0)
    }
}
