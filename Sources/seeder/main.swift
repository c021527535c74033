// seeder: serves the memory of a live process to leechers. Thin layer over
// FerryMigration: parses arguments, prints, sets the exit status.
import ArgumentParser
import FerryMigration
#if canImport(Glibc)
import Glibc
#endif

// A ParsableCommand today; turn it into an AsyncParsableCommand (and `await`
// the call below) when a subcommand becomes async.
struct SeederCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "seeder",
        abstract: "Track and serve the memory of a running process.",
        version: ferryVersion,
        subcommands: [TrackCommand.self, ServeCommand.self]
    )
}

SeederCommand.main()

/// Writes a whole line to a descriptor (1 = stdout, 2 = stderr) at once, so
/// lines reach pipes immediately and never interleave half-written.
func writeLine(_ text: String, to fd: Int32 = 1) {
    var line = text
    line.append("\n")
    line.withUTF8 { bytes in
        var done = 0
        while done < bytes.count {
            let n = write(fd, bytes.baseAddress! + done, bytes.count - done)
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { return }
            done += n
        }
    }
}
