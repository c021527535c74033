// CI-friendly fuzzing: thousands of seeded, deterministic random and mutated
// inputs thrown at every parser a hostile peer reaches (WireFuzz), at the
// stream deframer, and at a live secure channel. Nothing may crash, trap or
// allocate past the limits; a failure prints the seed and iteration.

import Testing
import FerryTestSupport
@testable import FerryWire

func mutate(_ seed: [UInt8], _ rng: inout SeededRandom) -> [UInt8] {
    var b = seed
    for _ in 0..<Int.random(in: 1...4, using: &rng) {
        switch Int.random(in: 0..<7, using: &rng) {
        case 0 where !b.isEmpty: b[Int.random(in: 0..<b.count, using: &rng)] ^= UInt8(1 << Int.random(in: 0..<8, using: &rng))
        case 1 where !b.isEmpty: b[Int.random(in: 0..<b.count, using: &rng)] = UInt8.random(in: 0...255, using: &rng)
        case 2 where !b.isEmpty: b.removeLast(Int.random(in: 1...b.count, using: &rng))
        case 3: b += (0..<Int.random(in: 1...16, using: &rng)).map { _ in UInt8.random(in: 0...255, using: &rng) }
        case 4 where b.count > 1: b.remove(at: Int.random(in: 0..<b.count, using: &rng))
        case 5 where !b.isEmpty:   // interesting values at a random offset
            let interesting: [UInt8] = [0x00, 0xFF, 0x7F, 0x80, 0x01]
            let v: UInt8 = interesting[Int.random(in: 0..<interesting.count, using: &rng)]
            let at = Int.random(in: 0..<b.count, using: &rng)
            b[at] = v
        default: b = (0..<Int.random(in: 0...64, using: &rng)).map { _ in UInt8.random(in: 0...255, using: &rng) }
        }
    }
    return b
}

/// Serialized: CPU-bound loops would otherwise occupy every cooperative thread
/// and starve the timer-based tests running beside them.
@Suite(.serialized) struct FuzzReplayTests {
    @Test func seedsAreAccepted() {
        for t in WireFuzz.Target.allCases where t != .credentialText {
            #expect(WireFuzz.run(t, WireFuzz.fixture.seeds[t]!), "seed for \(t) must pass its parser")
        }
    }

    @Test(arguments: WireFuzz.Target.allCases)
    func mutatedInputsNeverCrash(target: WireFuzz.Target) {
        var rng = SeededRandom(seed: 0xF022 &+ UInt64(target.rawValue))
        let seed = WireFuzz.fixture.seeds[target]!
        var accepted = 0
        for _ in 0..<1500 {
            if WireFuzz.run(target, mutate(seed, &rng)) { accepted += 1 }
        }
        // Authenticated messages must essentially never survive mutation.
        if [.serverHelloPSK, .clientAuthPSK, .serverHelloKeys, .clientAuthKeys, .serverAccept, .record].contains(target) {
            #expect(accepted < 15, "\(accepted) mutated \(target) inputs were accepted")
        }
    }

    @Test func frameDecoderSurvivesRandomStreams() {
        var rng = SeededRandom(seed: 42)
        for _ in 0..<2000 {
            let limit = Int.random(in: 0...64, using: &rng)
            var d = FrameDecoder(maxFrameSize: limit)
            var stream: [UInt8] = []
            for _ in 0..<Int.random(in: 0...4, using: &rng) {
                let n = Int.random(in: 0...80, using: &rng)
                stream += [UInt8(n >> 24 & 0xFF), UInt8(n >> 16 & 0xFF), UInt8(n >> 8 & 0xFF), UInt8(n & 0xFF)]
                stream += (0..<n).map { _ in UInt8.random(in: 0...255, using: &rng) }
            }
            stream = mutate(stream, &rng)
            var off = 0
            while off < stream.count {
                let chunk = min(stream.count - off, Int.random(in: 1...32, using: &rng))
                var frames: [[UInt8]] = []
                let used = stream[off..<off + chunk].withUnsafeBytes { d.feed($0) { frames.append($0) } }
                for f in frames { #expect(f.count <= limit) }
                if used < chunk { break }   // oversized announcement: decoding stopped
                off += chunk
            }
        }
    }

    @Test func secureChannelRejectsEveryMutatedRecord() async throws {
        var rng = SeededRandom(seed: 7)
        for i in 0..<200 {
            let (c, s, t) = try await securePair()
            let r = UInt64(rng.next())
            t.rewrite = { fs in
                var g = SeededRandom(seed: r)
                return fs.map { let m = mutate($0, &g); return m == $0 ? m + [0] : m }
            }
            try await c.send(Array("page data \(i)".utf8))
            await #expect(throws: (any Error).self) { try await s.receive() }
        }
    }
}
