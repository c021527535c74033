import ArgumentParser
import FerryCLI
import FerryMigration

@main
struct HubCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "hub",
        abstract: "Ferry's relay: one seeder to many leechers, and a meeting point behind NAT.",
        version: ferryVersion,
        subcommands: [HubServeCommand.self, KeygenCommand.self, SecretCommand.self]
    )
}
