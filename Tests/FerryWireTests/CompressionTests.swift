import Testing
import Synchronization
#if canImport(Glibc)
import Glibc
#endif
@testable import FerryWire

/// Text-like bytes that zstd shrinks several times (a heap of strings).
func compressibleBytes(_ count: Int, seed: UInt64 = 1) -> [UInt8] {
    let words = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet"].map { Array($0.utf8) }
    var out: [UInt8] = []
    out.reserveCapacity(count + 16)
    var x = seed
    while out.count < count {
        x = x &* 6364136223846793005 &+ 1442695040888963407
        out += words[Int(x >> 60) % words.count]
        out.append(UInt8(ascii: "0") + UInt8((x >> 32) % 10))
        out.append(0x20)
    }
    return Array(out.prefix(count))
}

func randomBytes(_ count: Int) -> [UInt8] {
    var g = SystemRandomNumberGenerator()
    return (0..<count).map { _ in UInt8.random(in: 0...255, using: &g) }
}

/// A zstd frame built by hand: RLE blocks of 128 KiB each, declaring
/// `declared` bytes (nil: no content size). 32768 blocks decode to 4 GiB
/// from 128 KiB: a decompression bomb (RFC 8878 § 3.1.1).
func zstdBomb(declared: UInt64?, blocks: Int) -> [UInt8] {
    var f: [UInt8] = [0x28, 0xB5, 0x2F, 0xFD]   // magic, little-endian
    if let declared {
        f.append(0xE0)   // Frame_Content_Size_flag 3 (8 bytes), Single_Segment
        for i in 0..<8 { f.append(UInt8(truncatingIfNeeded: declared >> (8 * UInt64(i)))) }
    } else {
        f.append(0x00)   // no content size, window descriptor follows
        f.append(17 << 3)   // window log 27
    }
    let blockSize = 128 << 10
    for i in 0..<blocks {
        let last = i == blocks - 1 ? 1 : 0
        let header = (blockSize << 3) | (1 << 1) | last   // RLE block
        f += [UInt8(header & 0xFF), UInt8((header >> 8) & 0xFF), UInt8((header >> 16) & 0xFF), 0x41]
    }
    return f
}

func maxRSSKiB() -> Int {
    var u = rusage()
    getrusage(RUSAGE_SELF.rawValue, &u)
    return u.ru_maxrss
}

@Suite struct CompressionTests {
    func options(_ mode: CompressionMode) -> SecureChannelOptions {
        var o = SecureChannelOptions(); o.compression = mode; return o
    }

    @Test func compressedRecordsRoundTrip() async throws {
        let (c, s, t) = try await securePair(options: options(.zstd))
        #expect(c.compression == .zstd && s.compression == .zstd)
        let sizes = Mutex<[Int]>([])
        t.rewrite = { fs in sizes.withLock { $0 += fs.map(\.count) }; return fs }
        let text = compressibleBytes(1 << 20)
        let noise = randomBytes(256 << 10)
        let frames: [[UInt8]] = [text, noise, [], [1, 2, 3], compressibleBytes(600, seed: 9), Array(repeating: 0, count: 8 << 20)]
        for f in frames { try await c.send(f) }
        for f in frames { #expect(try await s.receive() == f) }
        let wire = sizes.withLock { $0 }
        let overhead = c.cipher.overhead + 2   // type byte, flag byte
        #expect(wire[0] < text.count / 3, "text shrinks: \(wire[0]) bytes on the wire for \(text.count)")
        #expect(wire[1] == noise.count + overhead, "noise is sent raw, one flag byte longer")
        #expect(wire[2] == overhead && wire[3] == 3 + overhead)
        let stats = try #require(c.compressionStats)
        #expect(stats.compressedRecords >= 2 && stats.attempts >= 3, "\(stats)")
    }

    @Test(arguments: CompressionMode.allCases)
    func negotiationMatrix(client: CompressionMode) async throws {
        for server in CompressionMode.allCases {
            let psk = try PreSharedSecret.generate()
            let r = await handshake(client: .preSharedSecret(psk), server: .preSharedSecret(psk),
                                    clientOptions: options(client), serverOptions: options(server))
            let cl = try r.client.get(), sv = try r.server.get()
            let expected = CompressionMode.negotiate(client, server)
            #expect(cl.compression == expected && sv.compression == expected, "client \(client), server \(server)")
            #expect(cl.transcriptHash == sv.transcriptHash)
            // Data flows both ways in the negotiated format.
            let payload = compressibleBytes(100_000, seed: 5)
            try await cl.send(payload)
            #expect(try await sv.receive() == payload)
            try await sv.send(payload)
            #expect(try await cl.receive() == payload)
        }
    }

    @Test func negotiationTable() {
        #expect(CompressionMode.negotiate(.off, .zstd) == .off)
        #expect(CompressionMode.negotiate(.auto, .off) == .off)
        #expect(CompressionMode.negotiate(.auto, .auto) == .auto)
        #expect(CompressionMode.negotiate(.auto, .zstd) == .zstd)
        #expect(CompressionMode.negotiate(.zstd, .auto) == .zstd)
    }

    @Test func aClientThatOffersNothingSendsVersionOne() throws {
        let psk = try PreSharedSecret.generate()
        var off = try ClientHandshake(credentials: .preSharedSecret(psk), peer: "t", compression: .off)
        let hello = try off.hello()
        #expect(hello[5] == 0 && hello[6] == 1)
        var on = try ClientHandshake(credentials: .preSharedSecret(psk), peer: "t", compression: .auto)
        let hello2 = try on.hello()
        #expect(hello2[5] == 0 && hello2[6] == 2)
        #expect(hello2.count == hello.count + 3)
        #expect(Array(hello2.suffix(3)) == [CompressionMode.auto.wireValue, 1, CompressionAlgorithm.zstd.rawValue])
    }

    @Test func anOlderServerIsReportedWithTheWayOut() throws {
        let psk = try PreSharedSecret.generate()
        var client = try ClientHandshake(credentials: .preSharedSecret(psk), peer: "t", compression: .auto)
        _ = try client.hello()
        let reject = Reject.frame(.unsupportedVersion, "supported versions: 1")
        #expect { try client.handleServerHello(reject) } throws: { e in
            "\(e)".contains("does not support wire protocol version 2 (compression); upgrade it, or use --compress off to talk to it")
        }
    }

    @Test func aServerChoiceOutsideTheOfferIsRejected() throws {
        // A server (or an attacker before authentication) answering zstd to
        // a client that offered nothing is refused.
        let psk = try PreSharedSecret.generate()
        var client = try ClientHandshake(credentials: .preSharedSecret(psk), peer: "t", compression: .zstd)
        var server = try ServerHandshake(credentials: .preSharedSecret(psk), peer: "t", compression: .zstd)
        let hello = try client.hello()
        var reply = try server.handleClientHello(hello)
        #expect(reply[37] == CompressionMode.zstd.wireValue)
        reply[37] = CompressionMode.auto.wireValue   // a client that insisted on zstd gets auto: not allowed
        #expect { try client.handleServerHello(reply) } throws: { "\($0)".contains("does not allow") }
    }

    @Test func aDowngradedOfferFailsTheHandshake() async throws {
        // An attacker rewriting ClientHello's compression mode to off: the
        // transcript differs, so the server's proof does not verify.
        let (a, b) = InMemoryTransport.pair(names: ("leecher-end", "seeder-end"))
        let tb = TamperingTransport(b)
        tb.rewrite = { fs in fs.map { f in
            var f = f
            if f.first == WireMessageType.clientHello.rawValue { f[f.count - 3] = CompressionMode.off.wireValue }
            return f
        } }
        let psk = try PreSharedSecret.generate()
        async let s = Result { try await SecureChannel.server(over: tb, credentials: .preSharedSecret(psk), options: options(.zstd)) }
        let c = await Result { try await SecureChannel.client(over: a, credentials: .preSharedSecret(psk), options: options(.zstd)) }
        #expect(errorText(c).contains("altered in transit") || errorText(c).contains("secrets differ"), "\(errorText(c))")
        _ = await s
    }

    @Test func aFlippedFlagFailsAuthentication() async throws {
        let (c, s, t) = try await securePair(options: options(.zstd))
        let overhead = c.cipher.overhead
        // The flag is the last plaintext byte: flip the ciphertext byte over it.
        t.rewrite = { fs in fs.map { var f = $0; f[f.count - overhead - 1] ^= 1; return f } }
        try await c.send(compressibleBytes(64 << 10))
        await #expect { try await s.receive() } throws: { "\($0)".contains("frame failed authentication: altered, replayed or reordered") }
    }

    @Test func aDecompressionBombIsRefusedWithBoundedMemory() async throws {
        let (c, s, _) = try await securePair(options: options(.zstd))
        // 128 KiB that decode to 4 GiB, honest about it: refused from the header.
        let before = maxRSSKiB()
        try await c.sendEncoded(zstdBomb(declared: 4 << 30, blocks: 32768) + [RecordEncoding.zstd.rawValue])
        await #expect { try await s.receive() } throws: { e in
            "\(e)".contains("declares 4294967296 bytes, over the limit of \(WireLimits.maxFrame) bytes (a decompression bomb?)")
        }
        #expect(maxRSSKiB() - before < 256 << 10, "memory stayed bounded: \(maxRSSKiB() - before) KiB")   // 4 GiB if it were decoded; slack for tests running beside it
    }

    @Test func aBombThatLiesAboutItsSizeIsRefused() async throws {
        let (c, s, _) = try await securePair(options: options(.zstd))
        let before = maxRSSKiB()
        // Declares 1 MiB, holds 4 GiB of blocks: decoding stops at the bound.
        try await c.sendEncoded(zstdBomb(declared: 1 << 20, blocks: 32768) + [RecordEncoding.zstd.rawValue])
        await #expect { try await s.receive() } throws: { "\($0)".contains("is corrupt") }
        #expect(maxRSSKiB() - before < 256 << 10, "memory stayed bounded: \(maxRSSKiB() - before) KiB")   // 4 GiB if it were decoded; slack for tests running beside it
    }

    @Test func aFrameWithoutAContentSizeIsRefused() async throws {
        let (c, s, _) = try await securePair(options: options(.zstd))
        try await c.sendEncoded(zstdBomb(declared: nil, blocks: 4) + [RecordEncoding.zstd.rawValue])
        await #expect { try await s.receive() } throws: { "\($0)".contains("does not declare its decompressed size") }
    }

    @Test func anUnknownFlagIsRefused() async throws {
        let (c, s, _) = try await securePair(options: options(.zstd))
        try await c.sendEncoded([1, 2, 3, 7])
        await #expect { try await s.receive() } throws: { "\($0)".contains("unknown encoding flag 7") }
    }

    @Test func autoStaysOffOnAFastLink() async throws {
        // In memory the link is never the bottleneck: auto only probes.
        let (c, s, _) = try await securePair(options: options(.auto))
        #expect(c.compression == .auto)
        let text = compressibleBytes(1 << 20)
        let start = ContinuousClock.now
        for _ in 0..<20 {
            try await c.send(text)
            #expect(try await s.receive() == text)
        }
        let seconds = Int(start.duration(to: .now).components.seconds)
        let stats = try #require(c.compressionStats)
        // One probe a second at most (the test may take a while on a busy host).
        #expect(stats.attempts <= seconds + 2 && stats.attempts < 20, "probes only: \(stats) in \(seconds) s")
        #expect(stats.autoOnWindows == 0, "never switched on: \(stats)")
    }

    @Test func theGovernorCompressesOnASlowLinkOnly() {
        let g = CompressionGovernor(mode: .auto)
        // A compressor at 400 MB/s that halves the data.
        g.compressed(input: 1 << 20, output: 1 << 19, elapsed: .microseconds(2600))
        #expect(!g.shouldCompress(bytes: 1000))   // no link figure yet: stays off
        // 100 MB/s: every 1 MiB send waits 10 ms on a full queue; once
        // compressing, each 1 MiB on the wire carries 2 MiB of frames.
        for _ in 0..<60 {
            g.encoded(bytes: g.shouldCompress(bytes: 1000) ? 2 << 20 : 1 << 20)
            g.sent(wireBytes: 1 << 20, elapsed: .milliseconds(10)); usleep(10_000)
        }
        #expect(g.shouldCompress(bytes: 1000))
        #expect(g.stats.autoTrialsFailed == 0 && g.stats.autoOnWindows > 0)

        let fast = CompressionGovernor(mode: .auto)
        fast.compressed(input: 1 << 20, output: 1 << 19, elapsed: .microseconds(2600))
        // Sends never wait: the producer sets the pace.
        for _ in 0..<30 { fast.encoded(bytes: 1 << 20); fast.sent(wireBytes: 1 << 20, elapsed: .microseconds(20)); usleep(10_000) }
        #expect(!fast.shouldCompress(bytes: 1000))
    }

    @Test func theGovernorStopsWhenCompressingDoesNotHelp() {
        // A receiver starved of CPU: the queue drains at 100 MB/s of frames
        // whether they are compressed or not. Auto tries, sees no gain, stops.
        let g = CompressionGovernor(mode: .auto)
        g.compressed(input: 1 << 20, output: 1 << 19, elapsed: .microseconds(2600))
        var wasOn = false
        for _ in 0..<80 {
            let on = g.shouldCompress(bytes: 1000)
            wasOn = wasOn || on
            g.encoded(bytes: 1 << 20)
            g.sent(wireBytes: on ? 1 << 19 : 1 << 20, elapsed: .milliseconds(10)); usleep(10_000)
        }
        #expect(wasOn)
        #expect(g.stats.autoTrialsFailed == 1, "\(g.stats)")
        #expect(!g.shouldCompress(bytes: 1000))   // held off for a while
    }
}
