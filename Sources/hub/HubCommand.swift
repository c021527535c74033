import ArgumentParser
import FerryCLI
import FerryMigration

@main
struct HubCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "hub",
        abstract: "Ferry's relay: one seeder to many leechers (not yet available).",
        version: ferryVersion,
        subcommands: [ServeCommand.self, KeygenCommand.self, SecretCommand.self]
    )

    struct ServeCommand: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "serve", abstract: "Relay a migration (not yet available).")

        func run() throws {
            throw ValidationError("hub serve is not yet available; leechers can pull from a seeder directly")
        }
    }
}
