// `leecher pull --restore` (issue 13): the flags and events of a
// whole-process migration, memory by Ferry and everything else by CRIU
// (docs/user-guide.md "Move the whole process", Protocols/criu.md).
import ArgumentParser
import Foundation
import FerryCLI
import FerryCRIU
import FerryMigration
import FerryToolkit

struct RestoreOptions: ParsableArguments {
    @Flag(name: .long, help: ArgumentHelp(
        "Move the whole process: at Finalize fetch CRIU's images from a `seeder serve --with-criu`, restore the process here with `criu restore --lazy-pages` (detached: it outlives the leecher), and, as CRIU's lazy-pages daemon, fill its memory straight from what was pre-copied, touched pages first. Complete, after which CRIU kills the source, waits until the process runs here and every page is held. Needs CRIU 4.1 or later (--criu)."))
    var restore = false

    @Option(name: .long, help: ArgumentHelp("With --restore: the directory for CRIU's images and logs (default: a new one under /tmp; at most 89 bytes, for CRIU's socket there). CRIU logs at level $FERRY_CRIU_VERBOSITY, default 2 (4 to report a CRIU bug).", valueName: "DIR"))
    var images: String?

    @Option(name: .long, help: ArgumentHelp("With --restore: the criu to run (default: $FERRY_CRIU, then criu on PATH).", valueName: "PATH"))
    var criu: String?

    func validate(into: Int32?) throws {
        guard restore else {
            if images != nil || criu != nil { throw ValidationError("--images and --criu apply to --restore") }
            return
        }
        if into != nil { throw ValidationError("--restore and --into both say where the memory goes: use one") }
    }

    /// The restore driver, with CRIU checked before anything is pulled.
    func make(grace: Duration, reporter: Reporter) throws -> CriuRestore? {
        guard restore else { return nil }
        let found = try Criu.locate(flag: criu)
        let directory = images ?? (NSTemporaryDirectory() + "ferry-criu-\(getpid())")
        let began = ContinuousClock.now
        return try CriuRestore(criu: found, directory: directory, grace: grace) { event in
            Self.report(event, reporter, since: began)
        }
    }

    static func report(_ event: CriuRestoreEvent, _ reporter: Reporter, since began: ContinuousClock.Instant) {
        func ms(_ d: Duration) -> Double { d.inSeconds * 1000 }
        switch event {
        case .imagesReceived(let bytes, let files, let lazy):
            reporter.event("dumped", ["image_bytes": .int(Int64(bytes)), "files": .int(Int64(files)), "lazy_pages": .int(Int64(lazy))],
                           text: String(format: "leecher: CRIU dumped the source: %d image files, %.1f MB; %llu pages left lazy", files, Double(bytes) / 1e6, lazy))
        case .restored(let pid, let after):
            reporter.event("restored", ["pid": pid.map { .int(Int64($0)) } ?? .string("?"), "after_finalize_ms": .double(ms(after))],
                           text: String(format: "leecher: process restored here as pid %@, %.1f ms after the freeze", pid.map { "\($0)" } ?? "?", ms(after)))
        case .everyPageSent(let pages, let after):
            reporter.event("last_page", ["pages": .int(Int64(pages)), "after_finalize_ms": .double(ms(after))],
                           text: String(format: "leecher: every lazy page is in the restored process (%llu pages installed), %.1f ms after the freeze", pages, ms(after)))
        }
    }
}
