// The hub's compact per-leecher record of page versions sent.
import Testing
@testable import FerryMigration

@Suite struct PageVersionMapTests {
    @Test func agreesWithADictionaryOverRandomUse() {
        var map = PageVersionMap()
        var reference: [UInt64: UInt32] = [:]
        var generator = SystemRandomNumberGenerator()
        // Pages spread over a few chunks far apart, as in a real address space.
        let bases: [UInt64] = [0x5555_5555_4000, 0x7f00_0000_0000, 0x7fff_ffff_0000 & ~(pageSize - 1)]
        for _ in 0..<20_000 {
            let page = bases.randomElement(using: &generator)! + UInt64.random(in: 0..<2048, using: &generator) * pageSize
            switch Int.random(in: 0..<10, using: &generator) {
            case 0: map[page] = nil; reference[page] = nil
            case 1: map[page] = 0; reference[page] = 0
            default:
                let version = UInt32.random(in: 0..<1000, using: &generator)
                map[page] = version; reference[page] = version
            }
            #expect(map[page] == reference[page])
        }
        #expect(map.count == reference.count)
        for (page, version) in reference { #expect(map[page] == version) }
        #expect(map[0x1000] == nil, "never sent")
    }

    @Test func theLastVersionReadsBackConservatively() {
        var map = PageVersionMap()
        map[0x4000] = .max
        #expect(map[0x4000] == UInt32.max - 1, "differs from the current version, so the page counts dirty")
        #expect(map.count == 1)
    }
}
