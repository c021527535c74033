import Testing
@testable import FerryWire

@Suite struct FrameDecoderTests {
    static func stream(_ frames: [[UInt8]]) -> [UInt8] { frames.flatMap { FrameDecoder.encode($0) } }

    @Test func decodesWholeStream() throws {
        let frames: [[UInt8]] = [[], [1], [1, 2, 3, 4, 5], Array(repeating: 9, count: 70_000), []]
        var d = FrameDecoder(maxFrameSize: 1 << 20)
        #expect(try d.feed(Self.stream(frames)) == frames)
        #expect(d.isAtFrameBoundary)
        try d.finish()
    }

    @Test(arguments: [1, 2, 3, 4, 5, 7, 1000])
    func decodesAnySplit(chunk: Int) throws {
        let frames: [[UInt8]] = (0 ..< 20).map { i in (0 ..< i * 37).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ i) } }
        let bytes = Self.stream(frames)
        var d = FrameDecoder(maxFrameSize: 1 << 20)
        var out: [[UInt8]] = []
        var i = 0
        while i < bytes.count {
            out += try d.feed(Array(bytes[i ..< min(bytes.count, i + chunk)]))
            i += chunk
        }
        #expect(out == frames)
        try d.finish()
    }

    @Test func rejectsOversizedBeforeAllocating() {
        var d = FrameDecoder(maxFrameSize: 1000)
        // Split header: the check happens once the 4th byte arrives.
        #expect(throws: Never.self) { _ = try d.feed([0xFF, 0xFF]) }
        #expect(d.partialByteCount == 2)
        do {
            _ = try d.feed([0xFF, 0xFF, 1, 2, 3])
            Issue.record("accepted")
        } catch {
            #expect(error == .frameTooLarge(announced: Int(UInt32.max), limit: 1000))
            #expect(error.description == "peer announced a frame of 4294967295 bytes, limit 1000")
        }
        // Nothing was reserved for the body.
        #expect(d.partialByteCount == 0)
        #expect(d.oversizedAnnouncement == Int(UInt32.max))
    }

    @Test func exactLimitAccepted() throws {
        var d = FrameDecoder(maxFrameSize: 3)
        #expect(try d.feed(FrameDecoder.encode([1, 2, 3])) == [[1, 2, 3]])
        #expect(throws: FrameDecoder.Failure.self) { _ = try d.feed(FrameDecoder.encode([1, 2, 3, 4])) }
    }

    @Test func resumeAfterRaisingLimit() throws {
        var d = FrameDecoder(maxFrameSize: 2)
        let bytes = Self.stream([[1], [1, 2, 3, 4], [5]])
        var frames: [[UInt8]] = []
        let consumed = bytes.withUnsafeBytes { d.feed($0) { frames.append($0) } }
        #expect(frames == [[1]])
        #expect(consumed == 5 + 4, "stops right after the oversized header")
        let stillBlocked = d.resume()
        #expect(!stillBlocked, "still over the limit")
        d.maxFrameSize = 4
        let resumed = d.resume()
        #expect(resumed)
        #expect(try d.feed(Array(bytes[consumed...])) == [[1, 2, 3, 4], [5]])
    }

    @Test func endOfStreamMidFrame() throws {
        var d = FrameDecoder(maxFrameSize: 100)
        _ = try d.feed([0, 0, 0, 10, 1, 2])
        #expect(throws: FrameDecoder.Failure.closedMidFrame(received: 6, expected: 14)) { try d.finish() }
        var h = FrameDecoder(maxFrameSize: 100)
        _ = try h.feed([0, 0])
        #expect(throws: FrameDecoder.Failure.closedMidFrame(received: 2, expected: 4)) { try h.finish() }
        #expect(FrameDecoder.Failure.closedMidFrame(received: 2, expected: 4).description.hasPrefix("connection closed mid-frame"))
    }

    @Test func randomGarbageNeverCrashes() {
        var rng = SystemRandomNumberGenerator()
        for _ in 0 ..< 300 {
            var d = FrameDecoder(maxFrameSize: 4096)
            let bytes = (0 ..< Int.random(in: 0 ... 5000, using: &rng)).map { _ in UInt8.random(in: 0 ... 255, using: &rng) }
            if let frames = try? d.feed(bytes) {
                #expect(frames.allSatisfy { $0.count <= 4096 })
            }
        }
    }
}

extension FrameDecoderTests {
    @Test func directBodyRegion() throws {
        var d = FrameDecoder(maxFrameSize: 1 << 20)
        let payload = (0 ..< 300_000).map { UInt8(truncatingIfNeeded: $0 &* 7) }
        let stream = FrameDecoder.encode(payload) + FrameDecoder.encode([42])
        // Header and a little body through the copying path.
        #expect(try d.feed(Array(stream[0 ..< 1000])) == [])
        #expect(d.bodyRegion(minimum: 300_000) == nil, "less than the minimum is missing")
        var offset = 1000
        var frames: [[UInt8]] = []
        while let region = d.bodyRegion(minimum: 1) {
            let n = min(region.count, 65_536)
            stream.withUnsafeBytes { region.baseAddress!.copyMemory(from: $0.baseAddress! + offset, byteCount: n) }
            offset += n
            d.bodyReceived(n) { frames.append($0) }
        }
        #expect(frames == [payload])
        #expect(try d.feed(Array(stream[offset...])) == [[42]])
        #expect(d.isAtFrameBoundary)
    }
}
