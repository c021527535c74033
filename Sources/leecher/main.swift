import ArgumentParser
import FerryMigration

struct LeecherCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "leecher",
        abstract: "Ferry leecher (not yet available).",
        version: ferryVersion
    )

    func run() throws {
        throw ValidationError("leecher: not yet available")
    }
}

LeecherCommand.main()
