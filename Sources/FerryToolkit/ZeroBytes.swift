// The one test for "this page holds only zeros": the seeder sends such pages
// as zero runs, the hub and the image keep them as runs, and the verifier
// hashes holes as zeros. It runs on every page sent, so it is written to be
// fast on both answers.

/// True when every byte is zero. Compares 64 bytes per step (eight 8-byte
/// words OR-ed, which the compiler vectorizes) and stops at the first block
/// with a set bit, so non-zero pages are rejected early.
public func isAllZero(_ bytes: UnsafeRawBufferPointer) -> Bool {
    guard let base = bytes.baseAddress else { return true }
    let count = bytes.count
    var i = 0
    // SAFETY: every load below lies within `bytes` (i + 64 <= count, then i + 8 <= count, then i < count).
    while i + 64 <= count {
        let p = base + i
        let a = p.loadUnaligned(as: UInt64.self) | p.loadUnaligned(fromByteOffset: 8, as: UInt64.self)
        let b = p.loadUnaligned(fromByteOffset: 16, as: UInt64.self) | p.loadUnaligned(fromByteOffset: 24, as: UInt64.self)
        let c = p.loadUnaligned(fromByteOffset: 32, as: UInt64.self) | p.loadUnaligned(fromByteOffset: 40, as: UInt64.self)
        let d = p.loadUnaligned(fromByteOffset: 48, as: UInt64.self) | p.loadUnaligned(fromByteOffset: 56, as: UInt64.self)
        if (a | b | c | d) != 0 { return false }
        i += 64
    }
    while i + 8 <= count {
        if base.loadUnaligned(fromByteOffset: i, as: UInt64.self) != 0 { return false }
        i += 8
    }
    while i < count {
        if base.load(fromByteOffset: i, as: UInt8.self) != 0 { return false }
        i += 1
    }
    return true
}
