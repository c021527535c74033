// The bandwidth cap's token bucket and its RATE parser. Timed checks use
// lower bounds only (a busy machine makes anything slower, never faster);
// exact figures come from an injected clock.
import Testing
import Synchronization
@testable import FerryWire

/// A clock tests move by hand.
final class ManualClock: Sendable {
    let now = Mutex(0.0)
    func advance(_ seconds: Double) { now.withLock { $0 += seconds } }
    var read: Pacer.Clock { { [self] in now.withLock { $0 } } }
}

@Suite struct PacerTests {
    @Test func oneMiBAtTenMBPerSecondTakesAtLeastNinetyMilliseconds() async throws {
        let pacer = Pacer(rate: try BandwidthRate(parsing: "10M"))
        // Spend the initial burst first, so the timed bytes are all paced.
        try await pacer.pace(Int(Pacer.burst(for: 10e6)))
        let began = ContinuousClock.now
        for _ in 0..<16 { try await pacer.pace(64 << 10) }
        let took = ContinuousClock.now - began
        // 1 MiB / 10 MB/s = 104.9 ms.
        #expect(took >= .milliseconds(90), "\(took)")
    }

    @Test func bytesPassAtTheRateOverAWindowWithAClockOfItsOwn() throws {
        let clock = ManualClock()
        let rate = 50e6
        let pacer = Pacer(rate: try BandwidthRate(bytesPerSecond: rate), clock: clock.read)
        // Sending 1 MiB parts as fast as the bucket lets them for 10 s of
        // clock: what passed is the rate times the time, plus one burst.
        var sent = 0.0
        var t = 0.0
        while t < 10 {
            if pacer.tryPass(1 << 20) {
                sent += Double(1 << 20)
            } else {
                clock.advance(0.001)
                t += 0.001
            }
        }
        let expected = rate * 10
        #expect(abs(sent - expected) <= Pacer.burst(for: rate) + Double(1 << 20), "\(sent) vs \(expected)")
    }

    @Test func urgentBytesNeverWaitButBulkPaysForThem() async throws {
        let clock = ManualClock()
        let pacer = Pacer(rate: try BandwidthRate(parsing: "1M"), clock: clock.read)
        #expect(pacer.tryPass(Int(Pacer.burst(for: 1e6))))
        // A touch goes at once even with no credit left...
        pacer.charge(100_000)
        #expect(pacer.bytesCounted.urgent == 100_000)
        // ...and bulk needs its own bytes plus the touch's: 0.1 s more.
        clock.advance(0.05)
        #expect(!pacer.tryPass(50_000))
        clock.advance(0.1)
        #expect(pacer.tryPass(50_000))
    }

    @Test func idleTimeBuysAtMostOneBurst() throws {
        let clock = ManualClock()
        let pacer = Pacer(rate: try BandwidthRate(parsing: "100M"), clock: clock.read)
        clock.advance(60)
        let burst = Int(Pacer.burst(for: 100e6))
        #expect(pacer.tryPass(burst))
        #expect(!pacer.tryPass(4096))
    }

    @Test func aRaisedCapReachesACallerAlreadyWaiting() async throws {
        let pacer = Pacer(rate: try BandwidthRate(parsing: "1K"))
        try await pacer.pace(Int(Pacer.burst(for: 1000)))
        // 1 MB at 1 kB/s would wait 1000 s; raised to 1 GB/s it goes now.
        let waiting = Task { try await pacer.pace(1_000_000) }
        try await Task.sleep(for: .milliseconds(50))
        let began = ContinuousClock.now
        pacer.setRate(try BandwidthRate(parsing: "1G"))
        try await waiting.value
        #expect(ContinuousClock.now - began < .seconds(5))
        pacer.setRate(nil)
        #expect(pacer.rate == nil)
        try await pacer.pace(1 << 30) // no cap: at once
    }

    @Test func refundedBytesAreNotPaidFor() throws {
        let clock = ManualClock()
        let pacer = Pacer(rate: try BandwidthRate(parsing: "1M"), clock: clock.read)
        #expect(pacer.tryPass(Int(Pacer.burst(for: 1e6))))
        clock.advance(0.5)
        #expect(pacer.tryPass(500_000))
        #expect(!pacer.tryPass(400_000))
        pacer.refund(500_000) // they were all-zero pages: no bytes came
        #expect(pacer.tryPass(400_000))
    }

    @Test func ratesParseWithDecimalAndBinaryUnits() throws {
        let cases: [(String, Double)] = [
            ("200M", 200e6), ("200m", 200e6), ("1G", 1e9), ("50MB/s", 50e6), ("50 MB/s", 50e6),
            ("1.5G", 1.5e9), ("500K", 500e3), ("100MiB", 100 * 1048576), ("1GiB/s", 1073741824),
            ("64KiB", 65536), ("123456", 123456), ("2000B", 2000), ("200MBps", 200e6), (" 1T ", 1e12),
        ]
        for (text, value) in cases {
            #expect(try BandwidthRate(parsing: text).bytesPerSecond == value, "\(text)")
        }
        #expect("\(try BandwidthRate(parsing: "200M"))" == "200 MB/s")
        #expect("\(try BandwidthRate(parsing: "1.5G"))" == "1.5 GB/s")
    }

    @Test func zeroNegativeAndGarbageAreRefusedWithAReason() {
        func error(_ text: String) -> BandwidthRateError? {
            do { _ = try BandwidthRate(parsing: text); return nil } catch { return error as? BandwidthRateError }
        }
        #expect(error("0") == .zero("0"))
        #expect(error("0M") == .zero("0M"))
        #expect(error("-5M") == .negative("-5M"))
        for garbage in ["", "fast", "M", "1e9", "1.2.3M", "12X", "inf", "nan", "0x10", "5 M B", "."] {
            #expect(error(garbage) == .garbage(garbage), "\(garbage)")
        }
        #expect(error("10") == .tooSmall("10"))
        #expect(error("99999T") == .outOfRange("99999T"))
        #expect("\(BandwidthRateError.zero("0"))".contains("positive rate"))
        #expect("\(BandwidthRateError.garbage("fast"))".contains("50M"))
    }
}
