import Testing
import FerryToolkit

@Suite struct ZeroBytesTests {
    @Test func emptyIsZero() {
        #expect(isAllZero(UnsafeRawBufferPointer(start: nil, count: 0)))
    }

    /// Every length up to two 64-byte blocks plus a tail, every position of
    /// a single set byte, from an aligned and an unaligned start.
    @Test func everyTailLengthAndPosition() {
        var bytes = [UInt8](repeating: 0, count: 160)
        bytes.withUnsafeMutableBytes { buffer in
            for start in [0, 1, 7] {
                for length in 0...(buffer.count - start) {
                    let view = UnsafeRawBufferPointer(rebasing: buffer[start..<start + length])
                    #expect(isAllZero(view), "length \(length) from \(start)")
                    for position in 0..<length {
                        buffer[start + position] = 0x80
                        #expect(!isAllZero(view), "byte \(position) of \(length) from \(start)")
                        buffer[start + position] = 0
                    }
                }
            }
        }
    }

    @Test func aPageWithTheLastByteSet() {
        var page = [UInt8](repeating: 0, count: 4096)
        #expect(page.withUnsafeBytes { isAllZero($0) })
        page[4095] = 1
        #expect(!page.withUnsafeBytes { isAllZero($0) })
    }
}
