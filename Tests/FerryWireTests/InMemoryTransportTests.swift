import Testing
@testable import FerryWire

@Suite struct InMemoryTransportTests {
    @Test func framesArriveInOrder() async throws {
        let (a, b) = InMemoryTransport.pair()
        for i in 0..<10 { try await a.send([UInt8(i), 1, 2]) }
        for i in 0..<10 { #expect(try await b.receive() == [UInt8(i), 1, 2]) }
    }

    @Test func closeDeliversBufferedFramesThenNil() async throws {
        let (a, b) = InMemoryTransport.pair()
        try await a.send([1])
        a.close()
        #expect(try await b.receive() == [1])
        #expect(try await b.receive() == nil)
        await #expect(throws: TransportError.self) { try await a.send([2]) }
        await #expect(throws: TransportError.self) { try await b.send([2]) }
    }

    @Test func backpressureSuspendsSender() async throws {
        let (a, b) = InMemoryTransport.pair(capacityFrames: 2)
        try await a.send([1]); try await a.send([2])
        let sent = Task { try await a.send([3]); return true }
        try await Task.sleep(for: .milliseconds(20))
        #expect(b.bufferedIncomingFrames == 2)
        #expect(try await b.receive() == [1])
        #expect(try await sent.value)
        #expect(try await b.receive() == [2])
        #expect(try await b.receive() == [3])
    }

    @Test func oversizedFrameThrowsAndCloses() async throws {
        let (a, b) = InMemoryTransport.pair()
        b.setMaxIncomingFrameSize(16)
        try await a.send([UInt8](repeating: 0, count: 17))
        await #expect(throws: TransportError.frameTooLarge(peer: "memory-a", size: 17, limit: 16)) { try await b.receive() }
        #expect(try await b.receive() == nil)
    }

    @Test func pendingReceiveWakesOnClose() async throws {
        let (a, b) = InMemoryTransport.pair()
        let r = Task { try await b.receive() }
        try await Task.sleep(for: .milliseconds(10))
        a.close()
        #expect(try await r.value == nil)
    }

    @Test func receiveIsCancellable() async throws {
        let (_, b) = InMemoryTransport.pair()
        let r = Task { try await b.receive() }
        try await Task.sleep(for: .milliseconds(10))
        r.cancel()
        await #expect(throws: CancellationError.self) { try await r.value }
    }
}
