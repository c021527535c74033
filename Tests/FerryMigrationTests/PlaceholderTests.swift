import Testing
@testable import FerryMigration

@Test func versionIsSet() {
    #expect(!ferryVersion.isEmpty)
}
