// The hub's page cache: one slot per page for its whole life, memory up to
// the bound and the spill file past it.
import Foundation
import Testing
@testable import FerryMigration

@Suite struct PageCacheTests {
    func page(_ byte: UInt8) -> [UInt8] { [UInt8](repeating: byte, count: Int(pageSize)) }

    func load(_ cache: PageCache, _ address: UInt64) throws -> [UInt8]? {
        guard let entry = cache.entry(address) else { return nil }
        var out = [UInt8](repeating: 0xEE, count: Int(pageSize))
        let data = try out.withUnsafeMutableBytes { try cache.load(entry, into: $0.baseAddress!) }
        return data ? out : [UInt8](repeating: 0, count: Int(pageSize))
    }

    @Test func aPageTogglingBetweenZeroAndDataKeepsOneSlot() throws {
        let cache = PageCache(memoryLimit: 4 * Int(pageSize), spillDirectory: NSTemporaryDirectory())
        for version in 0..<10 as Range<UInt32> {
            if version % 2 == 0 {
                try page(UInt8(version + 1)).withUnsafeBytes { try cache.store(0x1000, version: version, data: $0) }
            } else {
                try cache.store(0x1000, version: version, data: nil)
            }
        }
        #expect(cache.memoryBytes == Int(pageSize))
        #expect(cache.entry(0x1000)?.version == 9)
        #expect(try load(cache, 0x1000) == page(0))
        try page(0x42).withUnsafeBytes { try cache.store(0x1000, version: 10, data: $0) }
        #expect(try load(cache, 0x1000) == page(0x42))
        #expect(cache.memoryBytes == Int(pageSize))
    }

    /// A page upstream answered "unmapped" for is not served from its old
    /// copy; mapped again, it takes its old slot.
    @Test func aForgottenPageIsNotServedAndKeepsItsSlot() throws {
        let cache = PageCache(memoryLimit: 4 * Int(pageSize), spillDirectory: NSTemporaryDirectory())
        try page(0x11).withUnsafeBytes { try cache.store(0x1000, version: 3, data: $0) }
        cache.forget(0x1000)
        #expect(cache.entry(0x1000) == nil)
        try page(0x22).withUnsafeBytes { try cache.store(0x1000, version: 4, data: $0) }
        #expect(try load(cache, 0x1000) == page(0x22))
        #expect(cache.entry(0x1000)?.version == 4)
        #expect(cache.memoryBytes == Int(pageSize))
    }

    @Test func pagesPastTheMemoryBoundSpillAndReadBack() throws {
        let cache = PageCache(memoryLimit: 2 * Int(pageSize), spillDirectory: NSTemporaryDirectory())
        for index in 0..<6 {
            try page(UInt8(index + 1)).withUnsafeBytes {
                try cache.store(UInt64(index) * pageSize, version: 1, data: $0)
            }
        }
        #expect(cache.memoryBytes == 2 * Int(pageSize))
        #expect(cache.diskBytes == 4 * Int(pageSize))
        for index in 0..<6 {
            #expect(try load(cache, UInt64(index) * pageSize) == page(UInt8(index + 1)))
        }
    }

    @Test func noMemoryAtAllSpillsEverything() throws {
        let cache = PageCache(memoryLimit: 0, spillDirectory: NSTemporaryDirectory())
        try page(7).withUnsafeBytes { try cache.store(0, version: 1, data: $0) }
        #expect(cache.memoryBytes == 0)
        #expect(try load(cache, 0) == page(7))
    }
}
