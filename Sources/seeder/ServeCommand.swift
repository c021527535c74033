// `seeder serve`: placeholder until the migration issue lands (the lead replaces this file).
import ArgumentParser
#if canImport(Glibc)
import Glibc
#endif

struct ServeCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "serve",
        abstract: "Serve a process's memory to leechers (not yet available)."
    )

    @Argument(help: "The pid of the process to serve.")
    var pid: Int32

    func run() throws {
        writeLine("seeder: serve is not yet available (use 'seeder track <pid>' to watch a process's writes)", to: 2)
        throw ExitCode(2)
    }
}
