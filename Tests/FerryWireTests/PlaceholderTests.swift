import Testing
@testable import FerryWire

@Test func wireModuleLoads() {
    #expect(Bool(true))
}
