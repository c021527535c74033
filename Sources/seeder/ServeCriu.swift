// `seeder serve --with-criu` (issue 13): the flags of a whole-process
// migration, memory by Ferry and everything else by CRIU
// (docs/user-guide.md "Move the whole process", Protocols/criu.md).
import ArgumentParser
import Foundation
import FerryCLI
import FerryCRIU
import FerryMigration
import FerryToolkit

struct CriuServeOptions: ParsableArguments {
    @Flag(name: .long, help: ArgumentHelp(
        "Move the whole process: at Finalize, `criu dump --lazy-pages` freezes and dumps it (all but the memory Ferry moves) and holds it while the leecher (`pull --restore`) restores it; Complete lets CRIU kill the source, an abort or a leecher gone for --grace resumes it. Implies --then kill. Needs CRIU 4.1 or later (--criu)."))
    var withCriu = false

    @Option(name: .long, help: ArgumentHelp("With --with-criu: the criu to run (default: $FERRY_CRIU, then criu on PATH).", valueName: "PATH"))
    var criu: String?

    @Option(name: .long, help: ArgumentHelp("With --with-criu: the directory for CRIU's images and logs (default: a new one under /tmp). CRIU logs at level $FERRY_CRIU_VERBOSITY, default 2 (4 to report a CRIU bug).", valueName: "DIR"))
    var criuDir: String?

    /// CRIU, checked before the process is touched.
    func locate() throws -> Criu? {
        guard withCriu else {
            if criu != nil || criuDir != nil { throw ValidationError("--criu and --criu-dir apply to --with-criu") }
            return nil
        }
        return try Criu.locate(flag: criu)
    }

    /// The source the seeder serves: the process itself, or with CRIU the process CRIU dumps at Finalize.
    func source(_ process: TrackedProcess, criu: Criu?, grace: Duration, reporter: Reporter) throws -> (any MemorySource, (any SeederExtraMethods)?) {
        guard let criu else { return (process, nil) }
        let directory = criuDir ?? (NSTemporaryDirectory() + "ferry-criu-dump-\(process.pid)-\(getpid())")
        let source = try CriuMemorySource(process: process, criu: criu, workDirectory: directory, grace: grace) { took, repair in
            let ms = took.inSeconds * 1000
            let text = String(format: "seeder: CRIU dumped pid %d in %.1f ms (%@); it holds it frozen until the leecher is done", process.pid, ms, directory)
            switch repair {
            case .success(nil):
                reporter.event("dumped", ["pid": .int(Int64(process.pid)), "dump_ms": .double(ms), "directory": .string(directory)], text: text)
            case .success(let repair?):
                // CRIU's is_stack() bug (CriuDump.leaveLazy): its images held memory Ferry moves.
                reporter.event("dumped", ["pid": .int(Int64(process.pid)), "dump_ms": .double(ms), "directory": .string(directory),
                                          "relazied_pages": .uint(repair.pages), "relazied_bytes": .uint(repair.bytes)],
                               text: text + String(format: "; CRIU had written %llu pages it should have left lazy (a page-aligned stack pointer): flagged lazy again, %.1f MB dropped from its images",
                                                   repair.pages, Double(repair.bytes) / 1e6))
            case .failure(let error):
                reporter.event("dumped", ["pid": .int(Int64(process.pid)), "dump_ms": .double(ms), "directory": .string(directory),
                                          "relazy_error": .string("\(error)")],
                               text: text + "; its images could not be checked for memory CRIU should have left lazy (\(error)): they go as CRIU wrote them")
            }
        }
        return (source, source)
    }
}
