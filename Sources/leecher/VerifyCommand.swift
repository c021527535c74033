import ArgumentParser
import FerryCLI
import FerryMigration

struct VerifyCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "verify",
        abstract: "Compare an image with a process's memory, region for region and byte for byte.",
        discussion: """
            Use it on the source host after a migration with --then stop: the stopped source \
            must equal the image. Exit status 0 only when they match.
            """)

    @Argument(help: ArgumentHelp("The image directory (written by pull --out).", valueName: "DIR"))
    var directory: String

    @Option(name: .long, help: "The process to compare with (normally the stopped source).")
    var pid: Int32

    @OptionGroup var output: OutputOptions

    func run() throws {
        let reporter = Reporter(command: "leecher", json: output.json)
        do {
            let report = try ImageVerifier.compare(directory: directory, pid: pid)
            guard report.matches else {
                reporter.error("\(directory) does not match pid \(pid): \(report)")
                throw ExitCode.failure
            }
            reporter.event("verified", ["regions": .int(Int64(report.regionsCompared)),
                                        "bytes": .int(Int64(report.bytesCompared)), "pid": .int(Int64(pid))],
                           text: "leecher: \(report)")
        } catch let error as ExitCode {
            throw error
        } catch {
            reporter.error("\(error)")
            throw ExitCode.failure
        }
    }
}
