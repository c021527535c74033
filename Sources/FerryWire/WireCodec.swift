// Binary reader and writer for the wire protocol: big-endian integers and
// length-prefixed byte strings, every read bounds-checked before it happens.

/// A decoding failure: the input is shorter than a field, or a field is out of range.
public struct WireDecodeError: Error, CustomStringConvertible, Sendable, Equatable {
    public var what: String
    public init(_ what: String) { self.what = what }
    public var description: String { "malformed wire message: \(what)" }
}

/// Appends big-endian fields to a byte buffer.
public struct WireWriter: Sendable {
    public private(set) var bytes: [UInt8]

    public init(capacity: Int = 64) {
        bytes = []
        bytes.reserveCapacity(capacity)
    }

    public mutating func u8(_ v: UInt8) { bytes.append(v) }
    public mutating func u16(_ v: UInt16) {
        bytes.append(UInt8(truncatingIfNeeded: v >> 8))
        bytes.append(UInt8(truncatingIfNeeded: v))
    }
    public mutating func u32(_ v: UInt32) {
        for shift in stride(from: 24, through: 0, by: -8) { bytes.append(UInt8(truncatingIfNeeded: v >> UInt32(shift))) }
    }
    public mutating func u64(_ v: UInt64) {
        for shift in stride(from: 56, through: 0, by: -8) { bytes.append(UInt8(truncatingIfNeeded: v >> UInt64(shift))) }
    }
    public mutating func raw<C: Collection>(_ b: C) where C.Element == UInt8 { bytes.append(contentsOf: b) }
    /// A u16 length followed by the bytes; the caller keeps it under 65,536 bytes.
    public mutating func bytes16<C: Collection>(_ b: C) where C.Element == UInt8 {
        precondition(b.count <= Int(UInt16.max), "field longer than a u16 length allows")
        u16(UInt16(b.count)); raw(b)
    }
}

/// Reads big-endian fields from a byte buffer, checking bounds before every read.
public struct WireReader: Sendable {
    public let bytes: [UInt8]
    public private(set) var offset: Int
    public let end: Int

    public init(_ bytes: [UInt8], from start: Int = 0) {
        self.bytes = bytes
        self.offset = min(max(start, 0), bytes.count)
        self.end = bytes.count
    }

    public var remaining: Int { end - offset }
    public var isAtEnd: Bool { offset == end }

    private mutating func need(_ n: Int, _ field: String) throws(WireDecodeError) {
        guard n >= 0, n <= remaining else {
            throw WireDecodeError("\(field) needs \(n) bytes at offset \(offset), only \(remaining) left")
        }
    }
    public mutating func u8(_ field: String = "u8") throws(WireDecodeError) -> UInt8 {
        try need(1, field); defer { offset += 1 }; return bytes[offset]
    }
    public mutating func u16(_ field: String = "u16") throws(WireDecodeError) -> UInt16 {
        try need(2, field); defer { offset += 2 }
        return UInt16(bytes[offset]) << 8 | UInt16(bytes[offset + 1])
    }
    public mutating func u32(_ field: String = "u32") throws(WireDecodeError) -> UInt32 {
        try need(4, field); defer { offset += 4 }
        var v: UInt32 = 0
        for i in 0..<4 { v = v << 8 | UInt32(bytes[offset + i]) }
        return v
    }
    public mutating func u64(_ field: String = "u64") throws(WireDecodeError) -> UInt64 {
        try need(8, field); defer { offset += 8 }
        var v: UInt64 = 0
        for i in 0..<8 { v = v << 8 | UInt64(bytes[offset + i]) }
        return v
    }
    public mutating func raw(_ n: Int, _ field: String = "bytes") throws(WireDecodeError) -> [UInt8] {
        try need(n, field); defer { offset += n }
        return Array(bytes[offset..<offset + n])
    }
    /// A u16 length then that many bytes; `limit` is checked before the copy.
    public mutating func bytes16(_ field: String, limit: Int = Int(UInt16.max)) throws(WireDecodeError) -> [UInt8] {
        let n = Int(try u16("\(field) length"))
        guard n <= limit else { throw WireDecodeError("\(field) is \(n) bytes, over its limit of \(limit)") }
        return try raw(n, field)
    }
    public mutating func skip(_ n: Int, _ field: String = "bytes") throws(WireDecodeError) {
        try need(n, field); offset += n
    }
    public func expectEnd(_ message: String) throws(WireDecodeError) {
        guard isAtEnd else { throw WireDecodeError("\(remaining) trailing bytes after \(message)") }
    }
}

extension Array where Element == UInt8 {
    /// Lowercase hexadecimal, for test vectors and diagnostics.
    public var hexString: String {
        let digits = Array("0123456789abcdef".utf8)
        var out = [UInt8](); out.reserveCapacity(count * 2)
        for b in self { out.append(digits[Int(b >> 4)]); out.append(digits[Int(b & 15)]) }
        return String(decoding: out, as: UTF8.self)
    }

    /// Parses hexadecimal (whitespace ignored); nil when malformed.
    public init?(hex: String) {
        var out = [UInt8](); var high: UInt8? = nil
        for c in hex.utf8 {
            let v: UInt8
            switch c {
            case 0x30...0x39: v = c - 0x30
            case 0x61...0x66: v = c - 0x61 + 10
            case 0x41...0x46: v = c - 0x41 + 10
            case 0x20, 0x0a, 0x0d, 0x09: continue
            default: return nil
            }
            if let h = high { out.append(h << 4 | v); high = nil } else { high = v }
        }
        guard high == nil else { return nil }
        self = out
    }
}
