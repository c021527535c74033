import Testing
import FerryToolkit

@Suite struct RateMeterTests {
    @Test func emptyAndSingleSampleHaveNoRate() {
        var meter = RateMeter(window: .seconds(1))
        #expect(meter.perSecond == 0)
        meter.add(100, at: .now)
        #expect(meter.perSecond == 0)
        #expect(meter.span == .zero)
    }

    @Test func rateCountsEverythingAfterTheFirstSample() {
        var meter = RateMeter(window: .seconds(10))
        let start = ContinuousClock.now
        meter.add(1_000, at: start)
        meter.add(500, at: start + .milliseconds(500))
        meter.add(500, at: start + .seconds(1))
        #expect(meter.perSecond == 1_000)
        #expect(meter.span == .seconds(1))
    }

    @Test func samplesOlderThanTheWindowAreDropped() {
        var meter = RateMeter(window: .seconds(1))
        let start = ContinuousClock.now
        meter.add(1_000_000, at: start)
        for second in 1...4 { meter.add(10, at: start + .seconds(second)) }
        // Only the last samples within a second of the newest are kept, but
        // never fewer than two: the burst at the start has left the window.
        #expect(meter.span == .seconds(1))
        #expect(meter.perSecond == 10)
    }
}
