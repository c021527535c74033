import ArgumentParser
import FerryMigration

struct SeederCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "seeder",
        abstract: "Ferry seeder (not yet available).",
        version: ferryVersion
    )

    func run() throws {
        throw ValidationError("seeder: not yet available")
    }
}

SeederCommand.main()
