import ArgumentParser
import FerryMigration

struct HubCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "hub",
        abstract: "Ferry hub (not yet available).",
        version: ferryVersion
    )

    func run() throws {
        throw ValidationError("hub: not yet available")
    }
}

HubCommand.main()
