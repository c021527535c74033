import Testing
@testable import FerrySystem

@Test func addressRangeCountsPages() {
    let r = AddressRange(start: 0x1000, end: 0x5000)
    #expect(r.pageCount == 4)
    #expect(r.contains(0x4fff))
    #expect(!r.contains(0x5000))
}
