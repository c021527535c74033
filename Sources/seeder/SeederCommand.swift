import ArgumentParser
import FerryCLI
import FerryMigration

@main
struct SeederCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "seeder",
        abstract: "Ferry's source side: track a running process and serve its memory for live migration.",
        version: ferryVersion,
        subcommands: [ServeCommand.self, TrackCommand.self, KeygenCommand.self, SecretCommand.self]
    )
}
