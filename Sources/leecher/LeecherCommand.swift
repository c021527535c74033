import ArgumentParser
import FerryCLI
import FerryMigration

@main
struct LeecherCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "leecher",
        abstract: "Ferry's destination side: pull a running process's memory from a seeder.",
        version: ferryVersion,
        subcommands: [PullCommand.self, VerifyCommand.self, KeygenCommand.self, SecretCommand.self]
    )
}
