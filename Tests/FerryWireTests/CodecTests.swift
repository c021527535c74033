import Testing
@testable import FerryWire

@Suite struct CodecTests {
    @Test func roundTrip() throws {
        var w = WireWriter()
        w.u8(0xab); w.u16(0x1234); w.u32(0xdeadbeef); w.u64(0x0102030405060708); w.bytes16([9, 9])
        #expect(w.bytes.hexString == "ab1234deadbeef01020304050607080002" + "0909")
        var r = WireReader(w.bytes)
        #expect(try r.u8() == 0xab)
        #expect(try r.u16() == 0x1234)
        #expect(try r.u32() == 0xdeadbeef)
        #expect(try r.u64() == 0x0102030405060708)
        #expect(try r.bytes16("x") == [9, 9])
        try r.expectEnd("test")
    }

    @Test func shortInputThrows() {
        var r = WireReader([1, 2, 3])
        #expect(throws: WireDecodeError.self) { try r.u32("length") }
        var r2 = WireReader([0xff, 0xff, 1])
        #expect(throws: WireDecodeError.self) { try r2.bytes16("text", limit: 10) }
    }

    @Test func hex() {
        #expect([UInt8](hex: "00ff10") == [0, 255, 16])
        #expect([UInt8](hex: "0") == nil)
        #expect([UInt8](hex: "zz") == nil)
    }
}
